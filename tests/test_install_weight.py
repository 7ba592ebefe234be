"""benchmarks/install_weight.py groups the installed distributions by what pulls them in (README's install table)."""
from install_weight import groups, installed, report


def test_groups_split_the_base_from_the_extras():
    dists = installed()
    g = groups(dists)
    base = g["base: torch"] | g["base: torch's CUDA libraries and Triton"] | g["base: the rest"]
    assert g["base: torch"] == {"torch"} and {"torchvision", "pillow", "numpy"} <= g["base: the rest"]
    test = next(members for name, members in g.items() if name.startswith(".[test]"))
    assert {"pytest", "hypothesis"} <= test and not test & base  # an extra lists only what it adds
    assert all("nvidia" in n or "cuda" in n or n == "triton" for n in g["base: torch's CUDA libraries and Triton"])
    assert "| everything installed |" in report(dists)
