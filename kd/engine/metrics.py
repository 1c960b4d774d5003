"""What a model's test logits say beyond accuracy: calibration (ECE) and agreement with the
teacher. Computed by the loop on the selected epoch's logits; the reports only read them."""
import torch
import torch.nn.functional as F


def expected_calibration_error(logits, labels, bins=15):
    """ECE in percent: sum over equal-width confidence bins of |accuracy - confidence| * share."""
    probs = F.softmax(logits.float(), dim=1)
    confidence, predicted = probs.max(1)
    correct = (predicted == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            share = in_bin.float().mean().item()
            gap = (correct[in_bin].mean() - confidence[in_bin].mean()).abs().item()
            ece += gap * share
    return 100.0 * ece


def agreement(teacher_logits, student_logits):
    """Top-1 agreement with the teacher (percent) and mean KL(teacher || student) at T=1."""
    top1 = (teacher_logits.argmax(1) == student_logits.argmax(1)).float().mean().item()
    kl = F.kl_div(F.log_softmax(student_logits.float(), 1), F.log_softmax(teacher_logits.float(), 1),
                  reduction='batchmean', log_target=True).item()
    return {'agreement': 100.0 * top1, 'kl_to_teacher': kl}
