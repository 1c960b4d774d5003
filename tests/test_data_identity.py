"""Data identified by content: the digests of the training and test images, what they key (the
teacher's stored test logits, resume, the teacher check), and --subset as it acts on the data."""
import json
import os
import pickle
import shutil

import pytest
import torch

import main
from conftest import run_cli, snapshot
from kd.data.datasets import DatasetArrays, content_sha256, effective_subset, load_dataset
from kd.models import build_model
from kd.engine.metrics import agreement
from kd.run.evaluate import evaluation_differences
from kd.run.runner import describe_subset
from kd.run.teacher import TeacherMismatch, check_data, load_for_inference, logits_path
from kd.engine.evaluate import accuracy, predict
from kd.data.loader import make_loaders

# the small cnn teacher: these runs check which images and logits a run uses, not the model
FAST = ['--batch-size', '32', '--device', 'cpu', '--no-amp', '--teacher-arch', 'cnn']


def edited_copy(src, dst, batch, images=slice(0, 50)):
    """A copy of the data root src at dst whose `batch` file has other pixels for `images`
    (inverted), with the same count and the same labels."""
    shutil.copytree(src, dst)
    path = os.path.join(dst, 'cifar-10-batches-py', batch)
    with open(path, 'rb') as f:
        content = pickle.load(f)
    content['data'][images] = 255 - content['data'][images]
    with open(path, 'wb') as f:
        pickle.dump(content, f, protocol=2)
    return str(dst)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def fresh_predictions(checkpoint, arch, data_dir):
    """A checkpoint's logits on data_dir's test images, computed here from scratch."""
    data = make_loaders(data_dir, 32, 'cpu', 0.0, eval_batch_size=1000, channels_last=True,
                        download=False)
    model = load_for_inference(build_model(arch, 10), checkpoint, torch.device('cpu'))
    return predict(model, data.test)[0], data.test.labels


@pytest.fixture(scope='module')
def runs(cifar_dir, tmp_path_factory):
    """A teacher trained with --subset 100000 (more than the 200 + 100 images), then a students'
    run without --subset on a copy of the data whose test pixels differ, in a folder holding the
    teacher, its logits and results.json of the original test images, and its record without
    the training images' digest (as an older version wrote it)."""
    root = tmp_path_factory.mktemp('identity')
    teacher_dir = str(root / 'teacher')
    teacher = run_cli('--train-teacher', '--epochs', '1', '--subset', '100000', '--data-dir',
                      cifar_dir, '--out-dir', teacher_dir, *FAST)
    assert teacher.returncode == 0, teacher.stderr
    test_edited = edited_copy(cifar_dir, root / 'test_edited', 'test_batch')
    students_dir = root / 'students'
    students_dir.mkdir()
    for name in ('best_teacher.pth', 'best_teacher.json', 'best_teacher_test_logits.pt',
                 'results.json'):
        shutil.copy(os.path.join(teacher_dir, name), students_dir)
    record = read_json(students_dir / 'best_teacher.json')
    del record['train_images_sha256']
    (students_dir / 'best_teacher.json').write_text(json.dumps(record))
    stale = torch.load(students_dir / 'best_teacher_test_logits.pt', weights_only=True)['logits']
    students = run_cli('--epochs', '1', '--data-dir', test_edited, '--out-dir', students_dir,
                       *FAST)
    assert students.returncode == 0, students.stderr
    return {'root': root, 'teacher_dir': teacher_dir, 'teacher': teacher, 'stale': stale,
            'test_edited': test_edited, 'students_dir': str(students_dir),
            'students': students}


# ---------------------------------------------------------------------------------------------
# The digests

def test_digests_follow_the_content_not_the_folder(cifar_dir, tmp_path):
    original = load_dataset(cifar_dir, download=False)
    moved = load_dataset(shutil.copytree(cifar_dir, tmp_path / 'elsewhere'), download=False)
    assert (moved.train_sha256, moved.test_sha256) == (original.train_sha256,
                                                       original.test_sha256)
    assert len(original.train_sha256) == 64
    pixels = load_dataset(edited_copy(cifar_dir, tmp_path / 'pixels', 'test_batch',
                                      images=slice(7, 8)), download=False)
    assert pixels.train_sha256 == original.train_sha256
    assert pixels.test_sha256 != original.test_sha256
    train_x, train_y, test_x, test_y = original
    relabelled = DatasetArrays(train_x, (train_y + 1) % 10, test_x, test_y)
    assert relabelled.train_sha256 != original.train_sha256
    assert relabelled.test_sha256 == original.test_sha256


def test_subset_digests_describe_the_images_used(cifar_dir):
    full = load_dataset(cifar_dir, download=False)  # 200 training, 100 test images
    part = full.first(150)
    assert len(part[1]) == 150 and len(part[3]) == 100
    assert part.train_sha256 == content_sha256(full[0][:150], full[1][:150])
    assert part.train_sha256 != full.train_sha256 and part.test_sha256 == full.test_sha256
    assert full.first(None) is full and full.first(200) is full and full.first(10**6) is full
    assert pickle.loads(pickle.dumps(part)).train_sha256 == part.train_sha256
    data = make_loaders(batch_size=32, val_fraction=0.0, subset=150, arrays=tuple(full))
    assert data.arrays.train_sha256 == part.train_sha256


def test_effective_subset_and_what_the_run_says():
    assert [effective_subset(s, 200, 100) for s in (None, 50, 150, 199, 200, 10**5)] == \
        [None, 50, 150, 199, None, None]
    assert describe_subset(150, 150, 'CIFAR-10', 200, 100).endswith(
        'a quick run on part of CIFAR-10 (the first 150 of 200 training images and all 100 '
        'test images), not comparable to full-data numbers')
    everything = describe_subset(100000, None, 'CIFAR-10', 200, 100)
    assert 'all of them are used' in everything and 'quick run' not in everything


# ---------------------------------------------------------------------------------------------
# --subset larger than the data, and the records

def test_a_subset_larger_than_the_data_is_a_full_run_and_recorded_as_none(runs, cifar_dir):
    out = runs['teacher'].stdout
    assert ('--subset 100000: CIFAR-10 has 200 training and 100 test images, so all of them '
            'are used') in out and 'quick run' not in out
    arrays = load_dataset(cifar_dir, download=False)
    results = read_json(os.path.join(runs['teacher_dir'], 'results.json'))
    record = read_json(os.path.join(runs['teacher_dir'], 'best_teacher.json'))
    for described in (results['config'], record):
        assert described['subset'] is None
        assert described['train_images_sha256'] == arrays.train_sha256
        assert described['test_images_sha256'] == arrays.test_sha256
    assert results['run']['subset'] is None
    assert results['config']['configuration']['subset'] == 'all'  # the recorded view, too
    # and students without --subset took this teacher (same images): runs['students'] ran


def test_changed_test_pixels_are_not_served_the_stored_logits(runs):
    out, stdout = runs['students_dir'], runs['students'].stdout
    assert 'teacher: computing its test-set logits' in stdout and 'reused' not in stdout
    # what the run reports is what the teacher does on these images, computed afresh here
    teacher, labels = fresh_predictions(os.path.join(out, 'best_teacher.pth'), 'cnn',
                                        runs['test_edited'])
    assert (teacher - runs['stale']).abs().max() > 1e-4  # the stale logits differ
    student, _ = fresh_predictions(os.path.join(out, 'best_student_kd.pth'), 'cnn',
                                   runs['test_edited'])
    results = read_json(os.path.join(out, 'results.json'))
    assert results['teacher_in_use']['test_acc'] == pytest.approx(accuracy(teacher, labels))
    assert results['models']['student_kd']['agreement'] == pytest.approx(
        agreement(teacher, student)['agreement'])
    # the computed logits are stored under the new test images' digest for the next run
    arrays = load_dataset(runs['test_edited'], download=False)
    stored = torch.load(logits_path(os.path.join(out, 'best_teacher.pth')), weights_only=True)
    assert stored['test_images_sha256'] == arrays.test_sha256
    assert torch.allclose(stored['logits'], teacher, atol=1e-4)
    for described in (results['config'], read_json(os.path.join(out, 'best_student_kd.json'))):
        assert described['train_images_sha256'] == arrays.train_sha256
        assert described['test_images_sha256'] == arrays.test_sha256
    # the teacher phase's results (of the original test images) are not merged with these:
    # the teacher row is the teacher these students used, measured on their test images
    assert set(results['phases']) == {'students'}
    assert results['models']['teacher']['test_acc'] == pytest.approx(accuracy(teacher, labels))
    assert 'last_test_acc' not in results['models']['teacher']
    assert 'held the teacher phase of a run on other test images' in stdout
    # a teacher record without the training images' digest (older file): a note, no refusal
    assert 'does not record which training images the teacher used' in stdout


def test_evaluate_stores_the_teacher_logits_it_computes(runs, cifar_dir, tmp_path):
    for ext in ('.pth', '.json'):
        shutil.copy(os.path.join(runs['teacher_dir'], 'best_teacher' + ext), tmp_path)
    args = ['--evaluate', '--data-dir', cifar_dir, '--out-dir', tmp_path, *FAST]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    assert 'computing its test-set logits' in first.stdout
    stored = torch.load(logits_path(str(tmp_path / 'best_teacher.pth')), weights_only=True)
    assert stored['test_images_sha256'] == load_dataset(cifar_dir, download=False).test_sha256
    second = run_cli(*args)
    assert second.returncode == 0, second.stderr
    assert 'test-set logits reused from' in second.stdout
    assert 'differ from those its run was tested on' not in second.stdout
    # on other test images than its run's, --evaluate says that its numbers are not results.md's
    other = run_cli('--evaluate', '--data-dir', runs['test_edited'], '--out-dir', tmp_path, *FAST)
    assert other.returncode == 0, other.stderr
    assert ('note: best_teacher.pth: these test images differ from those its run was tested on'
            in other.stdout) and 'not comparable with results.md' in other.stdout


def test_evaluate_says_when_students_were_distilled_from_another_teacher():
    record = {'test_images_sha256': 'a' * 64, 'teacher_sha256': 'b' * 64}
    assert evaluation_differences('student_kd', record, 'a' * 64, 'b' * 64) == []
    assert evaluation_differences('student_kd', None, 'c' * 64, 'd' * 64) == []
    notes = evaluation_differences('student_kd', record, 'c' * 64, 'd' * 64)
    assert len(notes) == 2 and 'test digest aaaaaaaaaaaa recorded, cccccccccccc here' in notes[0]
    assert notes[1].startswith('best_student_kd.pth was distilled from another teacher '
                               '(sha256 bbbbbbbbbbbb) than the best_teacher.pth here '
                               '(dddddddddddd)')


# ---------------------------------------------------------------------------------------------
# Other data: refused for a resume and for a teacher, not a mere other folder

def test_a_teacher_of_other_training_images_is_refused(runs, cifar_dir, tmp_path, capsys):
    other = edited_copy(cifar_dir, tmp_path / 'train_edited', 'data_batch_2')
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'best_student_kd.pth').write_bytes(b'an earlier result')
    before = snapshot(tmp_path)
    teacher = os.path.join(runs['teacher_dir'], 'best_teacher.pth')
    assert main.main(['--epochs', '1', '--data-dir', other, '--out-dir', str(out),
                      '--teacher-checkpoint', teacher, *FAST]) == 2
    err = capsys.readouterr().err
    recorded = read_json(os.path.join(runs['teacher_dir'], 'best_teacher.json'))
    here = load_dataset(other, download=False).train_sha256
    assert err.startswith('error:') and 'other training images' in err and err.count('\n') == 1
    assert recorded['train_images_sha256'][:12] in err and here[:12] in err
    assert snapshot(tmp_path) == before


def test_resume_refuses_other_images_but_not_another_folder(runs, cifar_dir, tmp_path, capsys):
    run = tmp_path / 'run'
    shutil.copytree(runs['students_dir'], run)
    state = torch.load(run / 'last_students.pt', weights_only=True)
    state['finished'], state['config']['epochs'] = False, 2  # as if stopped after epoch 1
    torch.save(state, run / 'last_students.pt')
    started_on = load_dataset(runs['test_edited'], download=False)
    args = ['--epochs', '2', '--out-dir', str(run), '--resume', *FAST]
    both = edited_copy(runs['test_edited'], tmp_path / 'train_edited', 'data_batch_1')
    # data root: what differs from the images the run started on (the test-edited copy)
    cases = {cifar_dir: 'test', both: 'training'}
    before = snapshot(run)
    for data_dir, what in cases.items():
        assert main.main(args + ['--data-dir', data_dir]) == 2
        err = capsys.readouterr().err
        now = load_dataset(data_dir, download=False)
        digests = {'test': (started_on.test_sha256, now.test_sha256),
                   'training': (started_on.train_sha256, now.train_sha256)}[what]
        assert err.startswith('error: cannot resume') and err.count('\n') == 1, err
        assert f'{what} images (sha256 {digests[0][:12]} saved, {digests[1][:12]} now)' in err
        assert snapshot(run) == before
    # the same images in another folder: data_dir is not what identifies the data
    moved = shutil.copytree(runs['test_edited'], tmp_path / 'moved')
    resumed = run_cli(*args, '--data-dir', moved)
    assert resumed.returncode == 0, resumed.stderr
    results = read_json(run / 'results.json')
    assert results['phases']['students']['config']['epochs'] == 2
    assert results['config']['test_images_sha256'] == started_on.test_sha256


# ---------------------------------------------------------------------------------------------
# The teacher check on records

def test_teacher_check_reads_records_as_the_data_they_name(cifar_dir):
    full = load_dataset(cifar_dir, download=False)
    split = {'dataset': 'cifar10', 'split_seed': 0, 'val_fraction': 0.1, 'subset': None}
    notes = []
    record = dict(split, subset=100000, train_images_sha256=full.train_sha256)  # older record
    check_data('t.pth', record, split, full, full, notes.append)
    assert notes == []
    check_data('t.pth', {k: v for k, v in record.items() if k != 'train_images_sha256'}, split,
               full, full, notes.append)
    assert len(notes) == 1 and 'cannot be checked' in notes[0]
    with pytest.raises(TeacherMismatch, match='other training images'):
        check_data('t.pth', dict(record, train_images_sha256='0' * 64), split, full, full,
                   notes.append)
    with pytest.raises(TeacherMismatch, match='--subset 150 for the teacher but all here'):
        check_data('t.pth', dict(record, subset=150), split, full, full, notes.append)
