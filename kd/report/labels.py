"""The names a report gives the models, and the phase (teacher or students) each belongs to."""

MODEL_LABELS = {'teacher': 'Teacher (ResNet-18)', 'student_kd': 'Student (KD)',
                'student_base': 'Student (baseline)'}


def model_label(name, entry=None):
    """Teacher (ResNet-18), Student (KD), Student (baseline), or a grid student's own name."""
    arch = (entry or {}).get('arch')
    if name == 'teacher' and arch not in (None, 'resnet18'):
        return f'Teacher ({arch})'
    return MODEL_LABELS.get(name, name)


def phase_of(name):
    """'teacher' for the teacher, 'students' for every student (each phase's results)."""
    return 'teacher' if name == 'teacher' else 'students'
