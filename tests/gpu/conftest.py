"""The GPU selection shares the op tests' NaN-poisoned torch.empty: an element a kernel forgets to write is NaN."""
from tests.ops.conftest import nan_poisoned_empty  # noqa: F401  (an autouse fixture, re-exported)
