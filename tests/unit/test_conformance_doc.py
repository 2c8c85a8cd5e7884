from pathlib import Path

from dicom_ai_node.conformance_statement import render


def test_conformance_statement_is_generated_from_the_code() -> None:
    doc = Path(__file__).parents[2] / "docs" / "conformance.md"
    assert doc.read_text() == render(), (
        "regenerate: python -m dicom_ai_node.conformance_statement > docs/conformance.md"
    )
