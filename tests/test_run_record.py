"""The run record: one frozen object, grown by dataclasses.replace, whose to_dict() is the
'config' written in states and results.json, keys in the order written before it existed."""
import dataclasses

import pytest
import torch

import main
from kd.run.record import DataDigests, Precisions, RunRecord, TeacherInfo
from kd.run.specs import phase_specs

CPU = torch.device('cpu')
DIGESTS = DataDigests('v' * 16, 't' * 64, 's' * 64)


def test_a_teacher_record_has_the_keys_of_the_files_in_their_order():
    config = main.parse_config(['--train-teacher', '--no-amp', '--subset', '20'])
    record = RunRecord.start(config, CPU, 1, phase_specs(config))
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.amp = True
    learned = dataclasses.replace(record, data=DIGESTS, memory_estimate_mb=12.5)
    before = learned.to_dict()   # what --resume compares: no precision yet
    assert 'precision' not in before and 'seed' not in before
    decided = dataclasses.replace(learned, precisions=Precisions({'teacher': None}, None,
                                                                 '--no-amp', None))
    per_seed = dataclasses.replace(decided, stacking={'mode': 'auto', 'stacked': False}, seed=3)
    out = per_seed.to_dict()
    assert list(out) == [
        'dataset', 'num_classes', 'epochs', 'batch_size', 'lr', 'weight_decay', 'val_fraction',
        'split_seed', 'subset', 'test_every', 'data_dir', 'out_dir', 'compile', 'amp',
        'configuration', 'device', 'world_size', 'val_images_sha256', 'train_images_sha256',
        'test_images_sha256', 'memory_estimate_mb', 'recipe', 'recipe_values', 'teacher_arch',
        'precision', 'precision_source', 'precision_decisions', 'seed', 'stacking']
    assert out['precision'] == {'teacher': 'fp32'} and out['amp'] is False
    assert out['configuration'] == record.configuration() and out['device'] == 'cpu'
    assert learned.to_dict() == before   # replace made new records; the earlier is unchanged


def test_a_students_record_names_its_teacher_and_one_setting():
    config = main.parse_config(['--temperature', '4', '--alpha', '0.1'])
    teacher = TeacherInfo('resnet18', 'a' * 64, 11, None)
    record = dataclasses.replace(RunRecord.start(config, CPU, 1, phase_specs(config), teacher),
                                 data=DIGESTS, memory_estimate_mb=1.0,
                                 precisions=Precisions({'student_kd': None, 'student_base': None},
                                                       torch.bfloat16, 'rule', None),
                                 teacher_form={'chosen': 'folded'})
    out = record.to_dict()
    assert (out['temperature'], out['alpha']) == (4.0, 0.1)
    assert out['teacher_arch'] == 'resnet18' and out['teacher_sha256'] == 'a' * 64
    assert out['teacher_precision'] == 'bf16' and out['teacher_form'] == {'chosen': 'folded'}
    assert [s['name'] for s in out['students']] == ['student_kd', 'student_base']
    assert record.configuration()['teacher arch'] == 'resnet18'
