"""Records: schemas and validation, loading, tokenization into response groups, collation.

The names are imported lazily, so ``from alignkit.data.records import RecordError`` (used by the
command line's fast paths) does not pull in torch and ``datasets``.
"""

from importlib import import_module

_WHERE = {
    "GroupCollator": "alignkit.data.collate",
    "load_records": "alignkit.data.loading",
    "SCHEMAS": "alignkit.data.records",
    "RecordError": "alignkit.data.records",
    "is_conversational": "alignkit.data.records",
    "message_text": "alignkit.data.records",
    "validate_record": "alignkit.data.records",
    "tokenize_group": "alignkit.data.tokenize",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'alignkit.data' has no attribute {name!r}")
