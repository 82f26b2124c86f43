"""The benchmark table: one Markdown row per variant, every metric column filled."""

from her2_core.aggregate import CLASSES
from model_training.benchmark import markdown_table


def test_markdown_table_has_a_row_per_model_and_all_columns():
    row = {"model": "tiny", "macro_auc": 0.91234, **{f"auc_{c}": 0.9 for c in CLASSES}, "accuracy": 0.8,
           "macro_f1": 0.75, "qwk": 0.7, "slide_macro_auc": 0.95, "slide_qwk": float("nan"),
           "parameters": 249_077, "trainable": 249_077, "train_seconds": 12.4}
    table = markdown_table([row, {**row, "model": "resnet34", "parameters": 21_287_237}], "architectures")
    lines = table.strip().splitlines()
    assert lines[0] == "### architectures"
    header, rule, first, second = lines[2:]
    assert header.count("|") == rule.count("|") == first.count("|") == second.count("|") == 15
    assert "| tiny | 0.912 |" in first and "| n/a |" in first and "| 0.249 | 0.249 | 12 |" in first
    assert second.startswith("| resnet34 |") and "| 21.287 |" in second
