"""An attack imported from another benchmark, known only through its poisoned test set."""

from typing import NoReturn

import torch

from .base import Attack, PoisonParams


class ImportedAttack(Attack):
    """An attack known only through its poisoned test set, as imported from another benchmark.

    The state is that set: triggered images `x_bd` (uint8 N×C×H×W), their backdoor labels `y_bd`, true labels
    `y_true` and indices `index` into the clean test set. Without the trigger nothing new can be poisoned.
    """

    name = "imported"
    params_type = PoisonParams
    state_dtypes = {"x_bd": torch.uint8, "y_bd": torch.int64, "y_true": torch.int64, "index": torch.int64}

    def checked_state(self, state: dict) -> dict[str, torch.Tensor]:
        if set(state) != set(self.state_dtypes):
            self.fail("state", f"expected tensors {sorted(self.state_dtypes)}, got {sorted(state)}")
        index = state["index"]
        count = len(index) if isinstance(index, torch.Tensor) and index.ndim == 1 else 0
        for key, dtype in self.state_dtypes.items():
            shape = (count, *self.shape) if key == "x_bd" else (count,)
            tensor = state[key]
            fits = isinstance(tensor, torch.Tensor) and tensor.dtype == dtype and tuple(tensor.shape) == shape
            if count == 0 or not fits:
                self.fail(f"state.{key}", f"expected a non-empty {dtype} tensor of shape (N, ...) = {shape}")
        for key in ("y_bd", "y_true"):
            if state[key].min() < 0 or state[key].max() >= self.num_classes:
                self.fail(f"state.{key}", f"labels must be in [0, {self.num_classes - 1}]")
        if index.min() < 0:
            self.fail("state.index", "indices must be >= 0")
        return {key: state[key].cpu() for key in self.state_dtypes}

    def make_state(self) -> NoReturn:
        self.fail("state", "required: an imported attack is its stored poisoned test set (from a model record)")

    def apply(self, x: torch.Tensor) -> NoReturn:
        self.fail("apply", "the trigger is unknown; only the poisoned test images were imported")

    def poison_train(self, x: torch.Tensor, y: torch.Tensor, seed: int) -> NoReturn:
        self.fail("poison_train", "an imported model cannot be re-trained: its trigger is unknown")

    def test_set(self, x: torch.Tensor,
                 y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The stored poisoned test set, once its indices and true labels are checked against `y`."""
        index, y_true = self.state["index"], self.state["y_true"]
        if index.max() >= len(y) or not torch.equal(y[index], y_true):
            self.fail("state.index", f"the stored images' indices and true labels do not match this test set "
                      f"({len(y)} images)")
        return self.state["x_bd"], self.state["y_bd"], y_true
