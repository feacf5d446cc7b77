import math

import torch

from crack_lightning.models.metrics import binary_metrics, choose_threshold


def test_binary_metrics_by_hand():
    probs = torch.tensor([0.9, 0.8, 0.4, 0.3, 0.6, 0.1])
    labels = torch.tensor([1, 1, 1, 0, 0, 0])
    m = binary_metrics(probs, labels, 0.5)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (2, 1, 1, 2)
    assert math.isclose(m["acc"], 4 / 6) and math.isclose(m["precision"], 2 / 3)
    assert math.isclose(m["recall"], 2 / 3) and math.isclose(m["f1"], 2 / 3)
    assert math.isclose(m["auroc"], 8 / 9, rel_tol=1e-6)


def test_threshold_maximises_f1_between_scores():
    probs = torch.tensor([0.95, 0.9, 0.35, 0.3, 0.2, 0.1])
    labels = torch.tensor([1, 1, 1, 0, 0, 0])
    t = choose_threshold(probs, labels)
    assert 0.3 < t < 0.35
    assert binary_metrics(probs, labels, t)["f1"] == 1.0
    assert binary_metrics(probs, labels, 0.5)["f1"] < 1.0


def test_threshold_fixed_rule_and_single_class():
    probs = torch.tensor([0.2, 0.7])
    assert choose_threshold(probs, torch.tensor([0, 1]), "fixed") == 0.5
    assert choose_threshold(probs, torch.tensor([1, 1])) == 0.5


def test_fpr_rule_is_the_lowest_threshold_within_budget():
    neg = torch.linspace(0.0, 0.5, 1000)  # 1000 negatives, the top ones up to 0.5
    pos = torch.tensor([0.3, 0.4992, 0.6, 0.9])
    probs, labels = torch.cat([neg, pos]), torch.cat([torch.zeros(1000), torch.ones(4)])
    t = choose_threshold(probs, labels, "fpr", target_fpr=0.002)  # 2 false positives allowed
    m = binary_metrics(probs, labels, t)
    assert m["fp"] == 2
    assert m["tp"] == 3  # 0.4992 is caught at the price of the 2 allowed false alarms
    assert choose_threshold(probs, labels, "fpr", target_fpr=0.001) > 0.4992  # 1 allowed: not caught
    assert choose_threshold(probs, labels, "fpr", target_fpr=0.0) > 0.5
