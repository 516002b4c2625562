"""tools/study.py: the study's table, figures and gate records from committed run records.

The fixture (tests/fixtures/study/) holds made-up records of 2 seeds x 3 arms in the formats train.py and
validate.py write; the expected numbers are computed here from those files, not copied from the tool."""
import argparse
import importlib.util
import json
import os
import shutil
import statistics
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

import timm_denseres  # noqa: F401  registers the models
from timm_denseres.gate_stats import gate_modules

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = Path(__file__).resolve().parent / 'fixtures' / 'study'
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
START, END = '<!-- study-table:start -->', '<!-- study-table:end -->'
CARD = """# Card

## Fashion-MNIST study

Intro.

<!-- study-table:start -->
<!-- study-table:end -->

## Next section
"""


def _load_tool():
    spec = importlib.util.spec_from_file_location('study_tool', ROOT / 'tools' / 'study.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


study = _load_tool()


@pytest.fixture
def workspace(tmp_path):
    results = tmp_path / 'results'
    shutil.copytree(FIXTURE, results)
    card = tmp_path / 'MODEL_CARD.md'
    card.write_text(CARD)
    return results, card, tmp_path / 'docs'


def _report(results, card, docs, *extra):
    return study.main(['report', '--results', str(results), '--doc', str(card), '--docs', str(docs),
                       '--card', str(card.parent / 'SUMMARY.md'), *extra])


def _top1(results: Path, run: str) -> float:
    return json.loads((results / run / 'validate.json').read_text())['top1']


def _seconds_per_epoch(results: Path, run: str) -> float:
    timing = json.loads((results / run / 'timing.json').read_text())
    return timing['train_seconds'] / timing['epochs']


def _table_rows(card: Path) -> dict:
    """{first cell: [other cells]} of the markdown table between the markers."""
    block = card.read_text().split(START)[1].split(END)[0]
    rows = [line.strip('|').split('|') for line in block.splitlines() if line.startswith('| ')]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows}


def test_report_writes_the_table_from_the_records(workspace, capsys):
    results, card, docs = workspace
    assert _report(results, card, docs) == 0
    rows = _table_rows(card)
    arms = ['resnet20', 'denseresnet20_n4', 'denseresnet20_n4-init3']
    top1 = {arm: [_top1(results, f'{arm}-s{seed}') for seed in (0, 1)] for arm in arms}
    assert rows['seed'] == ['`resnet20` top-1', '`denseresnet20_n4` top-1', '`denseresnet20_n4` − `resnet20`',
                            '`denseresnet20_n4-init3` top-1', '`denseresnet20_n4-init3` − `resnet20`']
    for seed in (0, 1):
        cells = rows[str(seed)]
        assert cells[0] == f'{top1["resnet20"][seed]:.2f} %'
        for column, arm in ((1, 'denseresnet20_n4'), (3, 'denseresnet20_n4-init3')):
            assert cells[column] == f'{top1[arm][seed]:.2f} %'
            assert cells[column + 1] == f'{top1[arm][seed] - top1["resnet20"][seed]:+.2f} pp'
    means = rows['mean ± std']
    for column, arm in ((0, 'resnet20'), (1, 'denseresnet20_n4'), (3, 'denseresnet20_n4-init3')):
        values = top1[arm]
        assert means[column] == f'{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} % (n=2)'
    for column, arm in ((2, 'denseresnet20_n4'), (4, 'denseresnet20_n4-init3')):
        diffs = [a - b for a, b in zip(top1[arm], top1['resnet20'])]
        assert means[column] == f'{statistics.mean(diffs):+.2f} ± {statistics.stdev(diffs):.2f} pp (n=2)'
    times = rows['s per epoch (mean)']
    for column, arm in ((0, 'resnet20'), (1, 'denseresnet20_n4'), (3, 'denseresnet20_n4-init3')):
        expected = statistics.mean(_seconds_per_epoch(results, f'{arm}-s{seed}') for seed in (0, 1))
        assert times[column] == f'{expected:.0f}'
    text = card.read_text()
    assert text.startswith(CARD.split(START)[0]) and text.endswith(END + '\n\n## Next section\n')
    assert "paper's" in text and '24.65 %' in text and '22.62 %' in text
    assert '| 0 |' in capsys.readouterr().out  # the table goes to stdout too
    assert (docs / study.CURVES_PNG).read_bytes().startswith(PNG_SIGNATURE)


def test_report_is_stable_and_check_detects_a_change(workspace):
    results, card, docs = workspace
    _report(results, card, docs)
    first = card.read_bytes()
    assert _report(results, card, docs) == 0
    assert card.read_bytes() == first
    assert _report(results, card, docs, '--check') == 0

    validate = results / 'resnet20-s1' / 'validate.json'
    record = json.loads(validate.read_text())
    validate.write_text(json.dumps(dict(record, top1=record['top1'] - 1.0)))
    assert _report(results, card, docs, '--check') == 1
    assert card.read_bytes() == first  # --check writes nothing


def test_unfinished_run_is_named_and_left_out(workspace, capsys):
    results, card, docs = workspace
    shutil.copytree(results / 'resnet20-s1', results / 'resnet20-s2')
    (results / 'resnet20-s2' / 'validate.json').unlink()
    assert _report(results, card, docs) == 0
    err = capsys.readouterr().err
    assert 'resnet20-s2' in err and 'validate.json' in err
    assert '2' not in _table_rows(card)
    assert _table_rows(card)['mean ± std'][0].endswith('(n=2)')


def test_collect_copies_only_finished_runs(tmp_path, capsys):
    runs = tmp_path / 'runs'
    shutil.copytree(FIXTURE / 'resnet20-s0', runs / 'resnet20-s0')
    (runs / 'resnet20-s0' / 'last.pth.tar').write_bytes(b'not a record')
    shutil.copytree(FIXTURE / 'resnet20-s1', runs / 'resnet20-s1')
    (runs / 'resnet20-s1' / 'timing.json').unlink()
    assert study.main(['collect', '--results', str(tmp_path / 'results'), *map(str, sorted(runs.iterdir()))]) == 0
    copied = tmp_path / 'results' / 'resnet20-s0'
    assert sorted(p.name for p in copied.iterdir()) == sorted(study.RECORDS)
    assert not (tmp_path / 'results' / 'resnet20-s1').exists()
    assert 'resnet20-s1' in capsys.readouterr().err


def test_run_dry_run_prints_train_and_validate(capsys):
    assert study.main(['run', 'denseresnet20_n4', '--seed', '2', '--variant-name', 'init3',
                       '--model-kwargs', 'gate_init_logit=3.0', '--epochs', '4', '--dry-run']) == 0
    train, validate = capsys.readouterr().out.splitlines()
    assert '--config recipes/fmnist_study.yaml' in train and '--experiment denseresnet20_n4-init3-s2' in train
    assert '--epochs 4' in train and '--model-kwargs gate_init_logit=3.0' in train
    assert 'denseresnet20_n4-init3-s2/last.pth.tar' in validate and '--results-format json' in validate
    assert '--in-chans 1 --input-size 1 28 28 --mean 0.286 --std 0.353' in validate


def test_run_resume_passes_the_last_checkpoint(capsys):
    assert study.main(['run', 'resnet20', '--seed', '1', '--output', 'somewhere', '--resume', '--dry-run']) == 0
    train, _ = capsys.readouterr().out.splitlines()
    assert train.endswith(f"--resume {Path(study.repo_path('somewhere')) / 'resnet20-s1' / 'last.pth.tar'}")


def test_run_names_folders_in_the_repo_relative_to_it(capsys, tmp_path):
    """train.py writes --data-dir and --output into args.yaml, a record: inside the repository they stay relative
    to it, so no record names a folder of the machine the run was made on."""
    assert study.main(['run', 'resnet20', '--seed', '0', '--data-dir', str(ROOT / 'data' / 'fm'),
                       '--output', str(tmp_path), '--dry-run']) == 0
    train, validate = capsys.readouterr().out.splitlines()
    assert '--data-dir data/fm ' in train and f'--output {tmp_path.resolve()} ' in train
    assert validate.split()[2] == 'data/fm' and str(ROOT) not in train + validate


SUMMARY_HEADER = 'epoch,train_loss,eval_loss,eval_top1,eval_top5,lr\n'  # as train.py writes it


def _summary_row(epoch: int) -> str:
    return f'{epoch},{1 / (epoch + 1)},0.5,{80 + epoch},99.0,0.1\n'


def _stopped_run(run_dir: Path, epochs_in_summary: int, checkpoint_epoch: int, started: int, saved: int) -> None:
    """A train.py run folder as a stopped run leaves it: summary.csv may hold an epoch after the checkpoint's."""
    run_dir.mkdir(exist_ok=True)
    shutil.copyfile(FIXTURE / 'resnet20-s1' / 'args.yaml', run_dir / 'args.yaml')
    (run_dir / 'summary.csv').write_text(SUMMARY_HEADER + ''.join(map(_summary_row, range(epochs_in_summary))))
    torch.save({'epoch': checkpoint_epoch, 'version': 2, 'args': argparse.Namespace(seed=1)},
               run_dir / 'last.pth.tar')
    os.utime(run_dir / 'args.yaml', (started, started))
    os.utime(run_dir / 'last.pth.tar', (saved, saved))


def _epochs(summary: Path) -> list:
    header, *rows = summary.read_text().splitlines()
    assert header.startswith('epoch,') and not any(row.startswith('epoch,') for row in rows)
    return [int(row.split(',')[0]) for row in rows]


def test_resume_keeps_the_checkpoints_epochs_and_their_time(tmp_path, capsys):
    run_dir = tmp_path / 'resnet20-s1'
    _stopped_run(run_dir, epochs_in_summary=3, checkpoint_epoch=1, started=1000, saved=1600)
    assert study.prepare_resume(run_dir) == {'train_seconds': 600, 'resumed_at_epoch': [2]}
    assert _epochs(run_dir / 'summary.csv') == [0, 1]  # epoch 2 had no checkpoint: it is trained again
    assert 'resuming resnet20-s1 after epoch 1' in capsys.readouterr().out
    # the resumed train.py writes its header again before epoch 2
    summary = run_dir / 'summary.csv'
    summary.write_text(summary.read_text() + SUMMARY_HEADER + _summary_row(2) + _summary_row(3))
    study.tidy_summary(summary)
    assert _epochs(summary) == [0, 1, 2, 3]
    # stopped again after epoch 3, then after a part that finished no epoch: each part counts what it finished
    _stopped_run(run_dir, epochs_in_summary=4, checkpoint_epoch=3, started=2000, saved=2300)
    assert study.prepare_resume(run_dir) == {'train_seconds': 900, 'resumed_at_epoch': [2, 4]}
    os.utime(run_dir / 'args.yaml', (3000, 3000))
    assert study.prepare_resume(run_dir) == {'train_seconds': 900, 'resumed_at_epoch': [2, 4, 4]}


def test_resume_without_a_checkpoint_says_so(tmp_path):
    with pytest.raises(SystemExit, match='nothing to resume in .*resnet20-s1'):
        study.prepare_resume(tmp_path / 'resnet20-s1')


def _tiny_image_folder(root: Path) -> None:
    for label in ('a', 'b'):
        folder = root / 'validation' / label
        folder.mkdir(parents=True)
        for i in range(3):
            Image.new('L', (28, 28), color=40 * i + (100 if label == 'b' else 0)).save(folder / f'{i}.png')


def test_gates_of_a_train_checkpoint(tmp_path):
    model = timm.create_model('denseresnet20_n4', num_classes=10, in_chans=1)
    checkpoint = tmp_path / 'denseresnet20_n4-s0' / 'last.pth.tar'
    checkpoint.parent.mkdir()
    torch.save({'arch': 'denseresnet20_n4', 'state_dict': model.state_dict(),
                'args': argparse.Namespace(model='denseresnet20_n4', seed=0)}, checkpoint)
    _tiny_image_folder(tmp_path / 'data')
    results = tmp_path / 'results'
    assert study.main(['report', '--results', str(results), '--gates', '--checkpoint', str(checkpoint),
                       '--model', 'denseresnet20_n4', '--data-dir', str(tmp_path / 'data')]) == 0

    record = json.loads((results / 'gates_denseresnet20_n4-s0.json').read_text())
    assert record['images'] == 6
    assert f'--gates --checkpoint {checkpoint} --model denseresnet20_n4' in record['command']
    assert list(record['w_mean']) == list(gate_modules(model))
    for block, weights in record['w_mean'].items():
        assert weights and sum(weights) == pytest.approx(1.0, abs=1e-5), block

    card, docs = tmp_path / 'MODEL_CARD.md', tmp_path / 'docs'
    card.write_text(CARD)
    assert _report(results, card, docs) == 0
    assert (docs / 'study_gates_denseresnet20_n4-s0.png').read_bytes().startswith(PNG_SIGNATURE)
    assert 'docs/study_gates_denseresnet20_n4-s0.png' in card.read_text()


def test_gates_of_a_pretrained_model_spec(tmp_path):
    _tiny_image_folder(tmp_path / 'data')
    spec = f'local-dir:{ROOT / "weights" / "denseresnet110_n4.fmnist"}'
    assert study.main(['report', '--results', str(tmp_path), '--gates', spec,
                       '--data-dir', str(tmp_path / 'data')]) == 0
    record = json.loads((tmp_path / 'gates_denseresnet110_n4.fmnist.json').read_text())
    assert list(record['w_mean']) == list(gate_modules(timm.create_model('denseresnet110_n4')))
    assert record['images'] == 6
    for block, weights in record['w_mean'].items():
        assert sum(weights) == pytest.approx(1.0, abs=1e-5), block


def _telemetry(run_dir: Path, epochs: int, moved: float) -> None:
    """A gates.csv as GateTelemetry writes it: per epoch a row for the model, then stages and blocks."""
    lines = ['epoch,scope,v,w_shortcut,w_moved,w_entropy,w']
    for epoch in range(epochs):
        lines += [f'{epoch},all,0.9,0.8,{moved * (epoch + 1) / epochs},0.5,', f'{epoch},layer1,0.9,0.8,0.0,0.5,',
                  f'{epoch},layer1.0,0.9,1.0,0.0,0.0,1.00000']
    (run_dir / 'gates.csv').write_text('\n'.join(lines) + '\n')


def test_report_shows_each_dense_runs_gates_at_the_final_epoch(workspace):
    results, card, docs = workspace
    epochs = len((results / 'denseresnet20_n4-init3-s0' / 'summary.csv').read_text().splitlines()) - 1
    _telemetry(results / 'denseresnet20_n4-init3-s0', epochs, moved=0.0625)
    assert _report(results, card, docs) == 0
    text = card.read_text()
    assert '| `denseresnet20_n4-init3-s0` | 0.900 | 0.800 | 0.0625 | 0.500 |' in text
    assert '`denseresnet20_n4-init3-s1`' not in text.split('Gate telemetry')[1]  # no telemetry, no row
    _telemetry(results / 'denseresnet20_n4-init3-s0', epochs - 1, moved=0.1)  # a telemetry that stops early
    assert _report(results, card, docs) == 0
    assert 'Gate telemetry' not in card.read_text()  # the run is left out, named on stderr


def test_report_writes_the_ablation_table_per_results_folder(workspace, tmp_path):
    results, card, docs = workspace
    card.write_text(CARD + '\n<!-- ablation-table:start -->\n<!-- ablation-table:end -->\n')
    summary = tmp_path / 'SUMMARY.md'  # the model card: the same table where it has the markers
    summary.write_text('# Model card\n\n<!-- ablation-table:start -->\n<!-- ablation-table:end -->\n')
    plan = tmp_path / 'plan.yaml'
    plan.write_text('results: x\narms:\n  resnet20: {model: resnet20}\n'
                    '  denseresnet20_n4-init3: {model: denseresnet20_n4, model_kwargs: [gate_init_logit=3.0]}\n'
                    '  denseresnet20_n4-gone: {model: denseresnet20_n4}\n')
    assert study.main(['report', '--results', str(results), '--doc', str(card), '--docs', str(docs),
                       '--card', str(tmp_path / 'SUMMARY.md'), '--ablation', str(results),
                       '--ablation-plan', str(plan)]) == 0
    block = card.read_text().split('<!-- ablation-table:start -->')[1]
    assert summary.read_text().split('<!-- ablation-table:start -->')[1] == block
    rows = {line.split(' | ')[0].strip('| '): line.split(' | ') for line in block.splitlines() if line.startswith('| `')}
    assert list(rows) == ['`resnet20`', '`denseresnet20_n4-init3`']  # plan order; an arm without runs left out
    dense, base = ([_top1(results, f'{arm}-s{seed}') for seed in (0, 1)]
                   for arm in ('denseresnet20_n4-init3', 'resnet20'))
    assert rows['`denseresnet20_n4-init3`'][1] == '`gate_init_logit=3.0`'
    assert rows['`denseresnet20_n4-init3`'][2] == f'{dense[0]:.2f} / {dense[1]:.2f} (seeds 0,1)'
    diffs = [a - b for a, b in zip(dense, base)]
    assert rows['`denseresnet20_n4-init3`'][4] == f'{statistics.mean(diffs):+.2f} ± {statistics.stdev(diffs):.2f} pp (n=2)'


def _shortened(results: Path, run: str, new_run: str, epochs: int) -> None:
    """A copy of a run's records under another arm name, cut to its first ``epochs`` epochs."""
    shutil.copytree(results / run, results / new_run)
    summary = results / new_run / 'summary.csv'
    summary.write_text(''.join(summary.read_text().splitlines(keepends=True)[:epochs + 1]))
    timing = json.loads((results / new_run / 'timing.json').read_text())
    (results / new_run / 'timing.json').write_text(json.dumps({**timing, 'epochs': epochs}))


def test_report_puts_the_default_studys_pairs_in_their_own_tables(workspace, tmp_path):
    """The arms of the study plan go between the default-table markers, one table per depth and schedule, each
    dense arm against the ResNet arm of its schedule; the other runs stay in the study table."""
    results, card, docs = workspace
    card.write_text(CARD + '\n<!-- default-table:start -->\n<!-- default-table:end -->\n')
    _shortened(results, 'resnet20-s0', 'resnet20-short-s0', 2)
    _shortened(results, 'denseresnet20_n4-init3-s0', 'denseresnet20_n4-init3-short-s0', 2)
    plan = tmp_path / 'plan.yaml'
    plan.write_text('results: x\narms:\n  resnet20: {model: resnet20}\n'
                    '  denseresnet20_n4-init3: {model: denseresnet20_n4}\n'
                    '  resnet20-short: {model: resnet20, epochs: 2}\n'
                    '  denseresnet20_n4-init3-short: {model: denseresnet20_n4, epochs: 2}\n')
    assert _report(results, card, docs, '--study-plan', str(plan)) == 0
    study_part, default_part = card.read_text().split('<!-- default-table:start -->')
    assert '`denseresnet20_n4` top-1' in study_part and '`resnet20` top-1' not in study_part
    assert '`resnet20` top-1' not in study_part.split(START)[1]
    tables = default_part.split('**Depth 20**')[1:]
    assert [t.split(' epochs;')[0].strip(' (') for t in tables] == ['2', '3']
    short = _top1(results, 'denseresnet20_n4-init3-short-s0') - _top1(results, 'resnet20-short-s0')
    assert f'| 0 | {_top1(results, "resnet20-short-s0"):.2f} % |' in tables[0]
    assert f'| {short:+.2f} pp |' in tables[0] and '`resnet20-short` top-1' in tables[0]
    assert '`resnet20` top-1' in tables[1] and '`denseresnet20_n4-init3` − `resnet20`' in tables[1]
    assert (docs / study.DEFAULT_CURVES_PNG).read_bytes().startswith(PNG_SIGNATURE)


def test_report_writes_the_studys_summary_into_the_model_card(workspace, tmp_path):
    results, card, docs = workspace
    summary = card.parent / 'SUMMARY.md'
    summary.write_text('# Card\n\n<!-- study-summary:start -->\n<!-- study-summary:end -->\n\nEnd.\n')
    plan = tmp_path / 'plan.yaml'
    plan.write_text('results: x\narms:\n  resnet20: {model: resnet20}\n'
                    '  denseresnet20_n4-init3: {model: denseresnet20_n4}\n')
    assert _report(results, card, docs, '--study-plan', str(plan)) == 0
    base, dense = ([_top1(results, f'{arm}-s{seed}') for seed in (0, 1)]
                   for arm in ('resnet20', 'denseresnet20_n4-init3'))
    diffs = [d - b for d, b in zip(dense, base)]
    row = [line for line in summary.read_text().splitlines() if line.startswith('| 20, 3 |')]
    assert row == [f'| 20, 3 | {statistics.mean(base):.2f} ± {statistics.stdev(base):.2f} % (n=2) | '
                   f'{statistics.mean(dense):.2f} ± {statistics.stdev(dense):.2f} % (n=2) | '
                   f'{diffs[0]:+.2f} (s0), {diffs[1]:+.2f} (s1) | '
                   f'{statistics.mean(diffs):+.2f} ± {statistics.stdev(diffs):.2f} pp (n=2) | – | the ResNet column |']
    assert summary.read_text().endswith('<!-- study-summary:end -->\n\nEnd.\n')
    assert _report(results, card, docs, '--study-plan', str(plan), '--check') == 0
    summary.write_text(summary.read_text().replace('(s0)', '(s9)'))
    assert _report(results, card, docs, '--study-plan', str(plan), '--check') == 1


def test_the_summary_compares_the_dense_arm_with_the_resnet_at_timms_default_too(workspace, tmp_path):
    """Where the results hold the ResNet at timm's defaults (its arm named as its model) with the same epochs, the
    summary row adds the dense arm's paired differences to it; an arm with other kwargs is not taken for it."""
    results, card, docs = workspace
    summary = card.parent / 'SUMMARY.md'
    summary.write_text('<!-- study-summary:start -->\n<!-- study-summary:end -->\n')
    for seed, top1 in ((0, 80.5), (1, 81.25)):
        shutil.copytree(results / f'resnet20-s{seed}', results / f'resnet20-nozil-s{seed}')
        record = results / f'resnet20-nozil-s{seed}' / 'validate.json'
        record.write_text(json.dumps({**json.loads(record.read_text()), 'top1': top1}))
    plan = tmp_path / 'plan.yaml'
    plan.write_text('results: x\narms:\n  resnet20-nozil: {model: resnet20}\n'
                    '  denseresnet20_n4-init3: {model: denseresnet20_n4}\n')
    assert _report(results, card, docs, '--study-plan', str(plan)) == 0
    dense = [_top1(results, f'denseresnet20_n4-init3-s{seed}') for seed in (0, 1)]
    plan_diffs = [dense[0] - 80.5, dense[1] - 81.25]
    default_diffs = [d - _top1(results, f'resnet20-s{seed}') for seed, d in enumerate(dense)]
    cells = [line for line in summary.read_text().splitlines() if line.startswith('| 20, 3 |')][0].split(' | ')
    assert cells[3] == f'{plan_diffs[0]:+.2f} (s0), {plan_diffs[1]:+.2f} (s1)'
    assert cells[-1] == (f'{default_diffs[0]:+.2f} (s0), {default_diffs[1]:+.2f} (s1); '
                         f'{statistics.mean(default_diffs):+.2f} ± {statistics.stdev(default_diffs):.2f} pp (n=2) |')


def test_a_gate_record_says_when_its_folder_holds_other_weights_now(tmp_path):
    folder = tmp_path / 'weights' / 'denseresnet20_n4.fmnist'
    folder.mkdir(parents=True)
    (folder / 'config.json').write_text(json.dumps({'weights_sha256': 'a' * 64}))
    record = {'command': f'python tools/study.py report --gates local-dir:{folder} --split validation'}
    assert study.replaced_weights_note(dict(record, weights_sha256='a' * 64)) == ''
    assert study.replaced_weights_note(record) == ''  # recorded before records kept the sha256
    note = study.replaced_weights_note(dict(record, weights_sha256='b' * 64))
    assert 'bbbbbbbbbbbb' in note and 'holds others now' in note and f'git log -- {folder}' in note


def test_a_terminated_run_stops_its_child(tmp_path):
    """SIGTERM to a process in `call` (as `study.py run` waits for train.py) ends the child too: a child left
    running would go on writing into the run's folder. The child writes its pid, then sleeps."""
    import signal
    import subprocess
    import sys
    import time
    pid_file = tmp_path / 'child.pid'
    child = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    parent = ('import sys; sys.path.insert(0, "tools"); import study; study.stop_children_on_sigterm(); '
              f'study.call([sys.executable, "-c", {child!r}], dict(__import__("os").environ), "test-run")')
    process = subprocess.Popen([sys.executable, '-c', parent], cwd=ROOT)
    deadline = time.time() + 60
    while not (pid_file.is_file() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    child_pid = int(pid_file.read_text())
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 128 + signal.SIGTERM
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(child_pid, 0)  # still there (or a zombie not yet reaped by init)
        except ProcessLookupError:
            break
        if Path(f'/proc/{child_pid}/stat').is_file() and ' Z ' in Path(f'/proc/{child_pid}/stat').read_text():
            break
        time.sleep(0.1)
    else:
        pytest.fail(f'the child {child_pid} outlived its terminated parent')
