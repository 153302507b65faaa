import pytest
import torch
from torch import nn

from backdoor.attacks import make_attack
from backdoor.data import ImageData, load_dataset
from backdoor.metrics import Metrics, der, eval_sets, evaluate

# Each 1×4×4 test image carries two class codes: pixel (0, 0) is what the model below predicts
# for the image, pixel (0, 1) what it predicts once the 1-pixel BadNets trigger at (3, 3) is present.
LABELS = [0, 1, 2, 1, 2, 0]
CLEAN_PRED = [0, 1, 0, 1, 2, 2]  # right on images 0, 1, 3, 4: ACC 4/6


class CodedModel(nn.Module):
    """Predicts the class code stored in the image; records the mode it was called in."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.num_classes = num_classes
        self.modes = []

    def forward(self, x):
        self.modes.append(self.training)
        codes = (x[:, 0, 0, :2] * 255).round().long()
        pred = torch.where(x[:, 0, 3, 3] == 1.0, codes[:, 1], codes[:, 0])
        return nn.functional.one_hot(pred, self.num_classes).float()


def coded_data(triggered_pred) -> ImageData:
    x = torch.zeros(6, 1, 4, 4, dtype=torch.uint8)
    x[:, 0, 0, 0] = torch.tensor(CLEAN_PRED, dtype=torch.uint8)
    x[:, 0, 0, 1] = torch.tensor(triggered_pred, dtype=torch.uint8)
    y = torch.tensor(LABELS)
    return ImageData("coded", x, y, x, y, 3, (0.0,), (1.0,))


def badnets(label_mode: str = "all2one"):
    return make_attack("badnets", {"patch_size": 1, "label_mode": label_mode}, (1, 4, 4), 3)


def test_all2one_excludes_target_class_images():
    data = coded_data(triggered_pred=[0, 0, 0, 1, 0, 0])
    sets = eval_sets(data, badnets())
    assert sets.y_true.tolist() == [1, 2, 1, 2] and sets.y_bd.tolist() == [0, 0, 0, 0]
    assert len(sets.x_clean) == 6 and (sets.x_bd[:, 0, 3, 3] == 255).all()
    metrics = evaluate(CodedModel(), sets)
    # Images 1, 2, 4 flip to the target; image 3 keeps its true label. Counting the two
    # target-class images (which also predict 0) would have given ASR 5/6 instead of 3/4.
    assert metrics.acc == pytest.approx(4 / 6)
    assert metrics.asr == pytest.approx(3 / 4)
    assert metrics.ra == pytest.approx(1 / 4)


def test_all2all_uses_every_image_and_shifted_labels():
    data = coded_data(triggered_pred=[1, 2, 0, 0, 0, 0])
    sets = eval_sets(data, badnets("all2all"))
    assert sets.y_bd.tolist() == [1, 2, 0, 2, 0, 1] and sets.y_true.tolist() == LABELS
    metrics = evaluate(CodedModel(), sets)
    assert metrics.asr == pytest.approx(4 / 6)  # images 0, 1, 2, 4
    assert metrics.ra == pytest.approx(1 / 6)  # image 5 (label 0)
    assert metrics.acc == pytest.approx(4 / 6)


def test_evaluate_uses_eval_mode_restores_mode_and_ignores_batch_size():
    sets = eval_sets(coded_data([0, 0, 0, 1, 0, 0]), badnets())
    model = CodedModel().train()
    one_by_one = evaluate(model, sets, batch_size=1)
    assert model.training and set(model.modes) == {False} and len(model.modes) == 10
    assert evaluate(model, sets) == one_by_one


def test_der_by_hand():
    before = Metrics(acc=0.90, asr=1.00, ra=0.0)
    assert der(before, Metrics(acc=0.85, asr=0.10, ra=0.8)) == pytest.approx((0.90 - 0.05 + 1) / 2)
    assert der(before, Metrics(acc=0.95, asr=1.00, ra=0.0)) == pytest.approx(0.5)  # gains are not rewarded
    assert der(before, Metrics(acc=0.90, asr=0.00, ra=0.9)) == pytest.approx(1.0)
    assert der(before, Metrics(acc=0.0, asr=1.00, ra=0.0)) == pytest.approx(0.05)


def test_eval_sets_on_digits_apply_the_trigger_to_non_target_images():
    data = load_dataset("digits")
    attack = make_attack("blended", {"target": 3}, data.shape, data.num_classes)
    sets = eval_sets(data, attack)
    keep = data.y_test != 3
    assert torch.equal(sets.x_bd, attack.apply(data.x_test[keep]))
    assert torch.equal(sets.y_true, data.y_test[keep]) and (sets.y_bd == 3).all()
    assert torch.equal(sets.x_clean, data.x_test) and torch.equal(sets.y_clean, data.y_test)
