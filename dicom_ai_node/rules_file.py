"""Reading a rules YAML file (the import/export format of the routing rules; the domain does no I/O)."""

from __future__ import annotations

from pathlib import Path

import yaml

from dicom_ai_node.domain.rules import RuleSet, parse_rules
from dicom_ai_node.errors import RuleError


def load_rules(path: str | Path) -> RuleSet:
    """Parse and validate a rules file; every problem is a RuleError naming the file."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except OSError as exc:
        raise RuleError(f"cannot read rules file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise RuleError(f"{path} is not valid YAML: {exc}") from exc
    return parse_rules(data, str(path))
