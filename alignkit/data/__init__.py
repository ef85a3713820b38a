"""Records: schemas and validation, loading, tokenization into response groups, collation."""

from alignkit.data.collate import GroupCollator
from alignkit.data.loading import load_records
from alignkit.data.records import SCHEMAS, RecordError, is_conversational, message_text, validate_record
from alignkit.data.tokenize import tokenize_group

__all__ = [
    "SCHEMAS", "GroupCollator", "RecordError", "is_conversational", "load_records", "message_text",
    "tokenize_group", "validate_record",
]
