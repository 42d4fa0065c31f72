"""The kernels are the lowest layer: nothing in ``kernels/`` imports the model's packages."""

import ast
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[2] / "kernels"
ABOVE = ("fusion", "inspection", "explain", "services")


def imported_packages(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


def test_no_kernel_module_imports_a_package_above_it():
    files = sorted(KERNELS.glob("*.py"))
    assert len(files) >= 5  # the check reads the real package
    offenders = {f.name: sorted(imported_packages(f) & set(ABOVE)) for f in files}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_model_uses_the_kernels_routing_record():
    from fusion.moe import Routing as FusionRouting
    from kernels.contracts import Routing

    assert FusionRouting is Routing
