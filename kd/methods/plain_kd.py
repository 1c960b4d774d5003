"""kd_loss with the seed's signature (positional T and alpha, one tensor back), as notebooks call
it from utils.py; the registered 'kd' in losses.py computes it."""
from kd.methods.losses import kd_loss as registered_kd


def kd_loss_terms(student_logits, teacher_logits, labels, temperature=4.0, alpha=0.1):
    """Hinton et al.'s distillation loss and its two parts, for logging.

        loss = alpha * CE(student, labels)
             + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))

    alpha weights the hard labels (alpha=0.1 puts 0.9 on the teacher). The KL is summed over
    classes and averaged over samples; T^2 keeps its gradient on the scale of the CE term.
    The softmaxes run in float32 whatever the autocast dtype, and no gradient reaches the
    teacher. Returns (loss, ce, kd) with kd the unweighted T^2 * KL term. (losses.py holds this
    loss with the others, as 'kd'.)
    """
    loss, parts = registered_kd(student_logits.float(), teacher_logits.float(), labels,
                                temperature=temperature, alpha=alpha)
    return loss, parts['ce'], parts['kd']


def kd_loss(student_logits, teacher_logits, labels, temperature=4.0, alpha=0.1):
    """alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(softmax(teacher/T) || softmax(student/T)).

    The KL is averaged per sample; alpha weights the hard labels, so alpha=0.1 puts 0.9 on the
    teacher. No gradient flows into teacher_logits. See kd_loss_terms for the parts.
    """
    return kd_loss_terms(student_logits, teacher_logits, labels, temperature, alpha)[0]
