# Type stubs of the dsv3 package (the docstrings are in __init__.py).
import os
from typing import Any, Dict, List, Mapping, Optional, Union

__version__: str

# a torch.Tensor (any device, any strides) or a numpy array (bf16/FP8 as ml_dtypes dtypes)
Tensor = Any
Config = Union[Dict[str, Any], str, None]

class InputError(ValueError):
    """Bad input, the message naming the culprit."""

def ops() -> List[str]: ...
def describe(op: str) -> Dict[str, Any]: ...
def reference(op: str, inputs: Mapping[str, Tensor], config: Config = None) -> Dict[str, Tensor]: ...

class Report:
    op: str
    passed: bool
    exit_code: int
    config: Dict[str, Any]
    # per output tensor: exact_fraction, max_abs, max_rel, max_ulp, similarity,
    # worst_index (a tuple into the tensor's shape, None when every element is exact),
    # expected, actual, violations, and the rest of the CLI report's fields
    tensors: Dict[str, Dict[str, Any]]
    saved: Optional[str]
    def __bool__(self) -> bool: ...
    def to_json(self) -> str: ...
    def failure_message(self) -> str: ...

def check(
    op: str,
    inputs: Mapping[str, Tensor],
    outputs: Mapping[str, Tensor],
    config: Config = None,
    exact: bool = False,
    save_to: Union[str, "os.PathLike[str]", None] = None,
) -> Report: ...
def assert_check(
    op: str,
    inputs: Mapping[str, Tensor],
    outputs: Mapping[str, Tensor],
    config: Config = None,
    exact: bool = False,
    save_to: Union[str, "os.PathLike[str]", None] = None,
) -> Report: ...
