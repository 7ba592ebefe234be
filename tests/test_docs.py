"""The parameter table in docs/api.md is generated from the models; this keeps it honest."""
import re
from pathlib import Path

from ahbf.models.summary import count_parameters

API = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def test_readme_parameter_table_matches_models():
    rows = re.findall(r"^\| (resnet\d+) \| (\d+) \| (\w+) \| (\d+) \| ([\d,]+) \| ([\d,]+) \|$",
                      API.read_text(), flags=re.M)
    assert len(rows) >= 12, "docs/api.md lost its parameter table"
    for arch, k, method, _aux, total, target in rows:
        assert count_parameters(arch, method, int(k)) == (int(total.replace(",", "")), int(target.replace(",", ""))), arch
