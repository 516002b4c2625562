"""The Fashion-MNIST study and its gate ablation (docs/fmnist_study.md): one command per run, one to make the results.

    python tools/study.py run denseresnet20_n4 --seed 0                  # train + validate + copy the records
    python tools/study.py run denseresnet20_n4 --seed 0 --variant-name init3 --model-kwargs gate_init_logit=3.0
    python tools/study.py run denseresnet20_n4 --seed 0 --resume         # go on from a stopped run's last.pth.tar
    python tools/study.py plan tools/plans/fmnist_gate_ablation.yaml --seeds 0 1 2 --jobs 2   # many runs, N at once
    python tools/study.py collect runs/study/*                           # copy the records of finished runs
    python tools/study.py report                                         # tables in docs/fmnist_study.md, figures
    python tools/study.py report --check                                 # exit 1 if those tables are stale
    python tools/study.py report --gates --checkpoint runs/study/denseresnet20_n4-s0/last.pth.tar \
        --model denseresnet20_n4 --data-dir data/fashion-mnist-20k      # mean gate weights (paper's Fig. 4)

A run `{model}{-variant}-s{seed}` trains with timm's train.py and recipes/fmnist_study.yaml, is scored by timm's
validate.py on its final-epoch weights (last.pth.tar), and leaves four records in results/fmnist_study/<run>/:
args.yaml, summary.csv (per epoch), validate.json (the final top-1) and timing.json, and for a dense model the
gates' telemetry gates.csv (per epoch). The report reads only those. Paths in the records are relative to the
repository (the runs are started from its root).
A development tool for this repository's own study, so it lives here and not in the package.
"""
import argparse
import csv
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import yaml

ROOT = Path(__file__).resolve().parent.parent
RECIPE = 'recipes/fmnist_study.yaml'
RECORDS = ('args.yaml', 'summary.csv', 'validate.json', 'timing.json')
TELEMETRY = 'gates.csv'  # written by a dense model's run (timm_denseres.gate_stats.GateTelemetry)
RESULTS = ROOT / 'results' / 'fmnist_study'
CURVES_PNG = 'study_curves_fmnist.png'
DEFAULT_CURVES_PNG = 'study_curves_fmnist_default.png'
STUDY_PLAN = 'tools/plans/fmnist_study.yaml'  # the study under the models' defaults: its arms get their own tables
STUDY_DOC = 'docs/fmnist_study.md'
ABLATION_RESULTS = ('results/fmnist_gate_ablation', 'results/fmnist_gate_ablation_cpu')
WIDTH = 116  # the model card's line length
RUN_NAME = re.compile(r'^(?P<arm>[A-Za-z0-9_.-]+)-s(?P<seed>\d+)$')


def recipe() -> dict:
    with open(ROOT / RECIPE) as f:
        return yaml.safe_load(f)


# ---- run / collect ---------------------------------------------------------------------------------------------

def run_commands(args: argparse.Namespace) -> List[List[str]]:
    """train.py with the study recipe, then validate.py on last.pth.tar with the recipe's data config."""
    r = recipe()
    run_dir = Path(args.output) / args.name
    kwargs = ['--model-kwargs', *args.model_kwargs] if args.model_kwargs else []
    train = [sys.executable, 'scripts/train.py', '--config', RECIPE, '--data-dir', args.data_dir,
             '--model', args.model, '--seed', str(args.seed), '--epochs', str(args.epochs),
             '--output', args.output, '--experiment', args.name, *kwargs]
    if args.device != r['device']:
        train += ['--device', args.device]
    if args.resume:
        train += ['--resume', str(run_dir / 'last.pth.tar')]
    validate = [sys.executable, 'scripts/validate.py', args.data_dir, '--split', r['val_split'],
                '--model', args.model, '--checkpoint', str(run_dir / 'last.pth.tar'), *kwargs,
                '--num-classes', str(r['num_classes']), '--in-chans', str(r['in_chans']),
                '--input-size', *map(str, r['input_size']), '--mean', *map(str, r['mean']),
                '--std', *map(str, r['std']), '--crop-pct', str(r['crop_pct']),
                '--interpolation', r['interpolation'], '--input-img-mode', r['input_img_mode'], '--device', args.device,
                '--batch-size', '256', '--workers', '1',
                '--results-file', str(run_dir / 'validate.json'), '--results-format', 'json']
    return [train, validate]


def repo_path(path: str) -> str:
    """``path`` relative to the repository root where it lies inside it (the runs start there), else absolute:
    the records then name no folder of the machine they were made on."""
    resolved = Path(os.path.abspath(path))  # not resolve(): a link inside the repository stays inside it
    try:
        return str(resolved.relative_to(ROOT))
    except ValueError:
        return str(resolved)


def stop_children_on_sigterm() -> None:
    """A terminated run or plan ends its children too (subprocess.run kills its child when the wait is interrupted;
    the plan terminates its runs): a train.py left running would go on writing into the run's folder, and a rerun's
    records would mix two trainings."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def call(command: List[str], env: Dict[str, str], run: str) -> None:
    if subprocess.run(command, cwd=ROOT, env=env).returncode != 0:
        sys.exit(f'error: {command[1]} failed for {run} (its output is above); no records copied')


def cmd_run(args: argparse.Namespace) -> int:
    args.name = f'{args.model}{"-" + args.variant_name if args.variant_name else ""}-s{args.seed}'
    args.epochs = args.epochs or recipe()['epochs']
    args.output, args.data_dir = repo_path(args.output), repo_path(args.data_dir)
    bad = [kv for kv in args.model_kwargs if '=' not in kv]
    if bad:
        sys.exit(f'error: --model-kwargs takes KEY=VALUE, got {bad}')
    train, validate = run_commands(args)
    if args.dry_run:
        for command in (train, validate):
            print(' '.join(command))
        return 0
    if not (ROOT / args.data_dir / 'train').is_dir():
        sys.exit(f'error: no {args.data_dir}/train; make it with scripts/prepare_fashion_mnist.py '
                 '--train-per-class 2000 --out data/fashion-mnist-20k, or pass --data-dir')
    run_dir = ROOT / args.output / args.name
    earlier = {'train_seconds': 0, 'resumed_at_epoch': []}
    if args.resume:
        earlier = prepare_resume(run_dir)
    elif (run_dir / 'summary.csv').exists():  # train.py would append a second run's epochs to it
        sys.exit(f'error: {run_dir} already holds a run; go on with --resume, remove it or choose another --output')
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    start = time.time()
    call(train, env, args.name)
    train_seconds = earlier['train_seconds'] + round(time.time() - start)
    tidy_summary(run_dir / 'summary.csv')
    call(validate, env, args.name)
    timing = {'train_seconds': train_seconds, 'epochs': args.epochs, 'threads': args.threads}
    if args.device != 'cpu':
        timing['device'] = args.device
    if earlier['resumed_at_epoch']:
        timing['resumed_at_epoch'] = earlier['resumed_at_epoch']
    (run_dir / 'timing.json').write_text(json.dumps(timing) + '\n')
    return cmd_collect(argparse.Namespace(run_dirs=[str(run_dir)], results=args.results))


def plan_runs(plan: dict, seeds: List[int],
              arms: Optional[List[str]] = None) -> List[Tuple[str, str, List[str], int, Optional[int]]]:
    """(model, variant, model kwargs, seed, epochs or None) of every run in a plan (of ``arms`` only, in their
    order, if given), seed by seed."""
    unknown = sorted(set(arms or []) - set(plan['arms']))
    if unknown:
        sys.exit(f'error: no arm {", ".join(unknown)} in the plan')
    runs = []
    for seed in seeds:
        for arm in arms or plan['arms']:
            spec = plan['arms'][arm]
            model = spec['model']
            if arm != model and not arm.startswith(model + '-'):
                sys.exit(f'error: arm {arm!r} must be named {model} or {model}-VARIANT')
            runs.append((model, arm[len(model) + 1:], list(spec.get('model_kwargs', [])), seed, spec.get('epochs')))
    return runs


def cmd_plan(args: argparse.Namespace) -> int:
    """Every run of a plan that has no records yet, ``--jobs`` at a time (each `run` with ``--threads``); a run
    stopped earlier goes on from its last checkpoint. Its output goes to ``<output>/logs/<run>.log``."""
    plan = yaml.safe_load(Path(args.plan).read_text())
    results = Path(args.results or ROOT / plan['results'])
    logs = ROOT / args.output / 'logs'
    logs.mkdir(parents=True, exist_ok=True)
    pending = []
    for model, variant, kwargs, seed, arm_epochs in plan_runs(plan, args.seeds, args.arms):
        name = f'{model}{"-" + variant if variant else ""}-s{seed}'
        if all((results / name / record).is_file() for record in RECORDS):
            continue
        command = [sys.executable, 'tools/study.py', 'run', model, '--seed', str(seed), '--results', str(results),
                   '--output', args.output, '--data-dir', args.data_dir, '--threads', str(args.threads),
                   '--device', args.device,
                   '--epochs', str(args.epochs or arm_epochs or plan.get('epochs') or recipe()['epochs'])]
        command += (['--variant-name', variant] if variant else []) + (['--model-kwargs', *kwargs] if kwargs else [])
        if (ROOT / args.output / name / 'last.pth.tar').is_file():
            command.append('--resume')
        pending.append((name, command))
    print(f'{len(pending)} runs to go, {args.jobs} at a time', flush=True)
    start, active, failed = time.time(), [], []
    try:
        _run_plan(pending, active, failed, logs, start, args)
    finally:
        for _, process, _ in active:  # stopped early (a signal, an error): the runs stop too
            process.terminate()
            process.wait()
    print(f'{len(pending)} runs not started (--start-within), {len(failed)} failed: {" ".join(failed)}')
    return 1 if failed else 0


def _run_plan(pending: list, active: list, failed: list, logs: Path, start: float, args: argparse.Namespace) -> None:
    while pending or active:
        late = args.start_within is not None and time.time() - start > args.start_within
        while pending and len(active) < args.jobs and not late:
            name, command = pending.pop(0)
            log = open(logs / f'{name}.log', 'w')
            active.append((name, subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), log))
            print(f'started {name} at {time.time() - start:.0f} s', flush=True)
        for entry in list(active):
            name, process, log = entry
            if process.poll() is not None:
                log.close()
                active.remove(entry)
                if process.returncode:
                    failed.append(name)
                print(f'{"FAILED" if process.returncode else "finished"} {name} at {time.time() - start:.0f} s '
                      f'(log: {logs / (name + ".log")})', flush=True)
        if late and not active:
            break
        time.sleep(1)


def tidy_summary(path: Path, epochs: Optional[int] = None) -> None:
    """One header (a resumed train.py writes another), and only the first `epochs` epochs if given."""
    lines = path.read_text().splitlines(keepends=True)
    rows = [line for line in lines[1:] if line != lines[0]]
    if epochs is not None:
        rows = [line for line in rows if int(line.split(',', 1)[0]) < epochs]
    path.write_text(''.join(lines[:1] + rows))


def prepare_resume(run_dir: Path) -> dict:
    """A stopped run goes on from its last.pth.tar: summary.csv keeps the epochs that checkpoint finished (an epoch
    written after it is trained again). Their time is the checkpoint's mtime less args.yaml's (train.py writes
    args.yaml as it starts, and again when it resumes): the time of an epoch that was cut off is not counted."""
    last = run_dir / 'last.pth.tar'
    if not last.is_file() or not (run_dir / 'summary.csv').is_file():
        sys.exit(f'error: nothing to resume in {run_dir}: no last.pth.tar and summary.csv')
    import torch  # only here: the report runs without it
    with torch.serialization.safe_globals([argparse.Namespace]):  # train.py stores its args, as timm loads them
        done = torch.load(last, map_location='cpu', weights_only=True)['epoch'] + 1  # saved after each epoch
    tidy_summary(run_dir / 'summary.csv', epochs=done)
    if (run_dir / TELEMETRY).is_file():
        tidy_summary(run_dir / TELEMETRY, epochs=done)
    # 0 when the last part finished no epoch (its args.yaml is newer than the checkpoint)
    part = {'train_seconds': max(0, round(last.stat().st_mtime - (run_dir / 'args.yaml').stat().st_mtime)),
            'resumed_at_epoch': [done]}
    previous = run_dir / 'timing_before_resume.json'  # a run resumed more than once
    if previous.is_file():
        before = json.loads(previous.read_text())
        part = {'train_seconds': before['train_seconds'] + part['train_seconds'],
                'resumed_at_epoch': before['resumed_at_epoch'] + part['resumed_at_epoch']}
    previous.write_text(json.dumps(part) + '\n')
    print(f'resuming {run_dir.name} after epoch {done - 1} ({part["train_seconds"]} s of training so far)')
    return part


def cmd_collect(args: argparse.Namespace) -> int:
    """Copy the records of each finished run (all four present) to RESULTS/<run>/; name the others."""
    for run_dir in map(Path, args.run_dirs):
        missing = [name for name in RECORDS if not (run_dir / name).is_file()]
        if missing:
            print(f'skipped {run_dir}: no {", ".join(missing)} (not finished?)', file=sys.stderr)
            continue
        dest = Path(args.results) / run_dir.name
        dest.mkdir(parents=True, exist_ok=True)
        for name in RECORDS + ((TELEMETRY,) if (run_dir / TELEMETRY).is_file() else ()):
            shutil.copyfile(run_dir / name, dest / name)
        print(f'copied {run_dir} -> {dest}')
    return 0


# ---- report: table -----------------------------------------------------------------------------------------------

@dataclass
class Run:
    arm: str  # model name plus variant, e.g. denseresnet20_n4-init3
    model: str
    seed: int
    top1: float  # validate.py on the final-epoch weights, percent
    seconds_per_epoch: float
    test_error: List[float]  # per epoch, percent, from summary.csv
    train_loss: float = float('nan')  # the final epoch's, from summary.csv
    device: str = 'cpu'
    gates: Optional[Dict[str, float]] = None  # the final epoch's telemetry over all blocks (gates.csv), if any

    @property
    def depth(self) -> int:
        return int(re.search(r'\d+', self.model).group())


def load_run(run_dir: Path) -> Run:
    """A run's records; ValueError saying what is missing or inconsistent."""
    match = RUN_NAME.match(run_dir.name)
    if not match:
        raise ValueError('the folder name is not {model}{-variant}-s{seed}')
    missing = [name for name in RECORDS if not (run_dir / name).is_file()]
    if missing:
        raise ValueError(f'no {", ".join(missing)} (an unfinished run?)')
    train_args = yaml.safe_load((run_dir / 'args.yaml').read_text())
    arm, seed = match['arm'], int(match['seed'])
    if not arm.startswith(train_args['model']) or train_args['seed'] != seed:
        raise ValueError(f'args.yaml says model {train_args["model"]} seed {train_args["seed"]}')
    timing = json.loads((run_dir / 'timing.json').read_text())
    with open(run_dir / 'summary.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    if len(rows) != timing['epochs']:
        raise ValueError(f'summary.csv has {len(rows)} epochs, timing.json says {timing["epochs"]}')
    return Run(arm, train_args['model'], seed,
               top1=float(json.loads((run_dir / 'validate.json').read_text())['top1']),
               seconds_per_epoch=timing['train_seconds'] / timing['epochs'],
               test_error=[100.0 - float(row['eval_top1']) for row in rows],
               train_loss=float(rows[-1]['train_loss']), device=timing.get('device', 'cpu'),
               gates=final_gates(run_dir / TELEMETRY, len(rows)))


def final_gates(path: Path, epochs: int) -> Optional[Dict[str, float]]:
    """The last epoch's model-wide row of a run's gates.csv (v, w_shortcut, w_moved, w_entropy)."""
    if not path.is_file():
        return None
    with open(path, newline='') as f:
        rows = [row for row in csv.DictReader(f) if row['scope'] == 'all']
    if not rows or int(rows[-1]['epoch']) != epochs - 1:
        raise ValueError(f'{path.name} has no row for the last epoch ({epochs - 1})')
    return {key: float(rows[-1][key]) for key in ('v', 'w_shortcut', 'w_moved', 'w_entropy')}


def load_runs(results: Path) -> List[Run]:
    runs = []
    for run_dir in sorted(p for p in results.iterdir() if p.is_dir()):
        try:
            runs.append(load_run(run_dir))
        except (ValueError, json.JSONDecodeError) as e:
            print(f'left out {run_dir}: {e}', file=sys.stderr)
        except KeyError as e:
            print(f'left out {run_dir}: a record lacks the key {e}', file=sys.stderr)
    return runs


def by_depth(runs: List[Run]) -> Dict[int, Dict[str, Dict[int, Run]]]:
    """{depth: {arm: {seed: run}}}, the ResNet arm first, then the dense arms by name."""
    groups: Dict[int, Dict[str, Dict[int, Run]]] = {}
    for run in sorted(runs, key=lambda r: (r.depth, not r.arm.startswith('resnet'), r.arm, r.seed)):
        groups.setdefault(run.depth, {}).setdefault(run.arm, {})[run.seed] = run
    return groups


def by_schedule(runs: List[Run]) -> Dict[Tuple[int, int], Dict[str, Dict[int, Run]]]:
    """{(depth, epochs): {arm: {seed: run}}}, the ResNet arm first: the pairs of the study under the defaults."""
    groups: Dict[Tuple[int, int], Dict[str, Dict[int, Run]]] = {}
    for run in sorted(runs, key=lambda r: (r.depth, len(r.test_error), not r.arm.startswith('resnet'), r.arm,
                                           r.seed)):
        groups.setdefault((run.depth, len(run.test_error)), {}).setdefault(run.arm, {})[run.seed] = run
    return groups


def mean_std(values: List[float], signed: bool = False, unit: str = '') -> str:
    sign = '+' if signed else ''
    if len(values) < 2:  # a sample std needs two values
        return f'{statistics.mean(values):{sign}.2f}{unit} (n=1)'
    return f'{statistics.mean(values):{sign}.2f} ± {statistics.stdev(values):.2f}{unit} (n={len(values)})'


def comparison_table(arms: Dict[str, Dict[int, Run]]) -> List[str]:
    """Rows per seed: each arm's top-1 and, for each dense arm, its paired difference to the ResNet arm."""
    names = list(arms)
    base = names[0] if names[0].startswith('resnet') else None
    header = ['seed']
    for arm in names:
        header.append(f'`{arm}` top-1')
        if base and arm != base:
            header.append(f'`{arm}` − `{base}`')
    seeds = sorted({seed for runs in arms.values() for seed in runs})
    rows = [[str(seed)] for seed in seeds]
    means, times = ['mean ± std'], ['s per epoch (mean)']
    for arm in names:
        runs = arms[arm]
        for row, seed in zip(rows, seeds):
            row.append(f'{runs[seed].top1:.2f} %' if seed in runs else '–')
        means.append(mean_std([r.top1 for r in runs.values()], unit=' %'))
        times.append(f'{statistics.mean(r.seconds_per_epoch for r in runs.values()):.0f}')
        if base and arm != base:
            paired = [s for s in seeds if s in runs and s in arms[base]]
            diffs = {s: runs[s].top1 - arms[base][s].top1 for s in paired}
            for row, seed in zip(rows, seeds):
                row.append(f'{diffs[seed]:+.2f} pp' if seed in diffs else '–')
            means.append(mean_std(list(diffs.values()), signed=True, unit=' pp') if diffs else '–')
            times.append('')
    cells = [header, ['---'] * len(header), *rows, means, times]
    return ['| ' + ' | '.join(row) + ' |' for row in cells]


def wrap(text: str) -> str:
    """A paragraph at the card's width; a command's hyphenated path is never split (it would not run if copied)."""
    return textwrap.fill(text, WIDTH, break_on_hyphens=False)


def paper_line() -> str:
    from timm_denseres.paper import PAPER_TABLE

    base, dense = PAPER_TABLE['resnet110'].top1_err, PAPER_TABLE['denseresnet110_n4'].top1_err
    return (f"The paper's numbers, for reference (CIFAR-100, not this data): ResNet-110 "
            f'{base:.2f} % and DenseResNet-110 N=4 {dense:.2f} % top-1 error, i.e. {base - dense:+.2f} pp top-1 '
            f'accuracy for the dense model.')


def telemetry_table(runs: List[Run]) -> List[str]:
    """The gates of each dense run at its final epoch (means over blocks and over the test images)."""
    rows = ['| run | v | shortcut w | w moved (mean abs from the start) | entropy of w (nats) |', '|---|---|---|---|---|']
    for run in runs:
        if run.gates:
            g = run.gates
            rows.append(f'| `{run.arm}-s{run.seed}` | {g["v"]:.3f} | {g["w_shortcut"]:.3f} | {g["w_moved"]:.4f} | '
                        f'{g["w_entropy"]:.3f} |')
    return rows if len(rows) > 2 else []


def study_block(runs: List[Run], gates: Dict[str, dict], figures: str = '', by_epochs: bool = False,
                curves: str = CURVES_PNG) -> str:
    """The study's tables and figures (``figures``: the folder of the PNGs, relative to the document); one table
    per depth, or per depth and number of epochs (``by_epochs``)."""
    lines = [wrap(paper_line()), ''] if not by_epochs else []
    if not runs:
        lines.append('No finished runs in `results/fmnist_study/` yet.')
    groups = by_schedule(runs) if by_epochs else by_depth(runs)
    for key, arms in groups.items():
        depth = key[0] if by_epochs else key
        epochs = sorted({len(r.test_error) for seeds in arms.values() for r in seeds.values()})
        caption = (f'**Depth {depth}** ({"/".join(map(str, epochs))} epochs; top-1 of the final-epoch weights on '
                   'all 10 000 test images; pp: percentage points; s per epoch: wall time of train.py per epoch, '
                   'with its per-epoch test pass):')
        lines += [wrap(caption), '', *comparison_table(arms), '']
        telemetry = telemetry_table([r for seeds in arms.values() for r in seeds.values()])
        if telemetry:
            lines += ['Gate telemetry at the final epoch (`gates.csv` of each run):', '', *telemetry, '']
    if runs:
        lines.append(f'![test error per epoch, mean and min-max over seeds]({figures}{curves})')
    for name, record in gates.items():
        caption = (f"Mean gate weights w_ik per block and offset (the paper's Fig. 4) of `{name}` over the "
                   f"`{record['split']}` split ({record['images']} images), recorded in "
                   f"`results/fmnist_study/gates_{name}.json` by `{record['command']}`"
                   + replaced_weights_note(record) + ':')
        figure = f'![mean gate weights w_ik of {name}]({figures}study_gates_{name}.png)'
        lines += ['', wrap(caption), '', figure]
    return '\n'.join(lines).rstrip('\n')


def summary_block(runs: List[Run], others: Sequence[Run] = ()) -> str:
    """One row per depth and schedule of the study under the defaults, for the model card: each arm's mean ± std,
    the paired differences per seed and their mean ± std, how far the dense arm's gates moved, and the dense arm
    against the ResNet at timm's defaults (an arm named as its model among ``others``, same epochs), if run."""
    head = ['depth, epochs', 'ResNet top-1', 'DenseResNet top-1', 'Dense − ResNet per seed', 'Dense − ResNet',
            'gates moved (w, mean)', "Dense − ResNet at timm's default (`zero_init_last=True`), per seed; mean"]
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for (depth, epochs), arms in by_schedule(runs).items():
        names = list(arms)
        if len(names) != 2 or not names[0].startswith('resnet'):
            continue
        base, dense = arms[names[0]], arms[names[1]]
        model = next(iter(base.values())).model
        timm_default = {r.seed: r for r in others if r.arm == r.model == model and len(r.test_error) == epochs}
        if names[0] == model:
            reference = 'the ResNet column'
        else:
            reference = '; '.join(_paired(dense, timm_default)) if timm_default else 'not run'
        lines.append('| ' + ' | '.join([
            f'{depth}, {epochs}', mean_std([r.top1 for r in base.values()], unit=' %'),
            mean_std([r.top1 for r in dense.values()], unit=' %'), *_paired(dense, base),
            _moved(dense), reference]) + ' |')
    return '\n'.join(lines) if len(lines) > 2 else 'No finished pair of the study under the defaults yet.'


def _paired(dense: Dict[int, Run], base: Dict[int, Run]) -> Tuple[str, str]:
    """The dense arm minus the ResNet arm per seed they share, and the mean ± std of those differences."""
    seeds = sorted(set(base) & set(dense))
    diffs = [dense[s].top1 - base[s].top1 for s in seeds]
    return (', '.join(f'{d:+.2f} (s{s})' for s, d in zip(seeds, diffs)) or '–',
            mean_std(diffs, signed=True, unit=' pp') if diffs else '–')


def _moved(dense: Dict[int, Run]) -> str:
    moved = [r.gates['w_moved'] for r in dense.values() if r.gates]
    return f'{statistics.mean(moved):.3f}' if moved else '–'


def _kwargs_text(kwargs: List[str]) -> str:
    return ', '.join(f'`{kv}`' for kv in kwargs) or 'the defaults'


def ablation_block(plan: dict, results: List[Path]) -> str:
    """One table per results folder (device): each arm of the plan, its top-1 per seed, mean ± std, the paired
    differences to both ResNet arms, the final train loss and the gates at the final epoch."""
    lines = []
    for folder in results:
        runs = load_runs(folder) if folder.is_dir() else []
        if not runs:
            continue
        arms: Dict[str, Dict[int, Run]] = {}
        for run in runs:
            arms.setdefault(run.arm, {})[run.seed] = run
        devices = sorted({run.device for run in runs})
        caption = (f'`{repo_path(str(folder))}` (train.py on {" and ".join(devices)}; top-1 of the final-epoch weights '
                   f'on all 10 000 test images; Δ: paired difference to the ResNet arm of the same seed; gates: the '
                   f'final epoch\'s telemetry, mean over the seeds):')
        lines += [wrap(caption), '']
        bases = [arm for arm in plan['arms'] if not plan['arms'][arm]['model'].startswith('dense') and arm in arms]
        head = ['arm', 'set-up', 'top-1 per seed (%)', 'mean ± std'] + [f'Δ `{b}`' for b in bases]
        head += ['train loss', 'v', 'shortcut w', 'w moved', 'entropy']
        lines += ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
        for arm, spec in plan['arms'].items():
            seeds = arms.get(arm)
            if not seeds:
                continue
            top1 = [seeds[s].top1 for s in sorted(seeds)]
            row = [f'`{arm}`', _kwargs_text(spec.get('model_kwargs', [])),
                   ' / '.join(f'{t:.2f}' for t in top1) + f' (seeds {",".join(map(str, sorted(seeds)))})',
                   mean_std(top1, unit=' %')]
            for base in bases:
                diffs = [seeds[s].top1 - arms[base][s].top1 for s in sorted(seeds) if s in arms[base]]
                row.append('' if arm == base or not diffs else mean_std(diffs, signed=True, unit=' pp'))
            row.append(f'{statistics.mean(r.train_loss for r in seeds.values()):.3f}')
            gates = [r.gates for r in seeds.values() if r.gates]
            for key, spec_ in (('v', '.3f'), ('w_shortcut', '.3f'), ('w_moved', '.4f'), ('w_entropy', '.3f')):
                row.append(format(statistics.mean(g[key] for g in gates), spec_) if gates else '')
            lines.append('| ' + ' | '.join(row) + ' |')
        lines.append('')
    return '\n'.join(lines).rstrip('\n') or 'No finished ablation runs yet.'


def replace_block(text: str, block: str, path: Path, name: str = 'study-table') -> str:
    start, end = f'<!-- {name}:start -->', f'<!-- {name}:end -->'
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise SystemExit(f'error: {path} needs one {start} line followed by one {end} line')
    head, rest = text.split(start)
    return f'{head}{start}\n{block}\n{end}{rest.split(end)[1]}'


# ---- report: figures ---------------------------------------------------------------------------------------------

def plot_curves(runs: List[Run], path: Path, by_epochs: bool = False) -> None:
    """Test error per epoch, mean line and min-max band over seeds per arm, one panel per depth (Fig. 3/5), or per
    depth and number of epochs."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    groups = by_schedule(runs) if by_epochs else by_depth(runs)
    fig, axes = plt.subplots(1, len(groups), figsize=(5.0 * len(groups), 3.8), squeeze=False)
    for ax, (key, arms) in zip(axes[0], groups.items()):
        for arm, seeds in arms.items():
            length = min(len(r.test_error) for r in seeds.values())
            errors = np.array([r.test_error[:length] for r in seeds.values()])
            epochs = np.arange(1, length + 1)
            ax.plot(epochs, errors.mean(0), marker='o', markersize=3, label=f'{arm} (n={len(errors)})')
            ax.fill_between(epochs, errors.min(0), errors.max(0), alpha=0.2)
        ax.set_title(f'Fashion-MNIST, depth {key[0]}, {key[1]} epochs' if by_epochs else
                     f'Fashion-MNIST, depth {key}', fontsize=10)
        ax.set_xlabel('epoch')
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel('test top-1 error (%)')
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def record_gate_json(args: argparse.Namespace) -> Path:
    """Mean w_ik per block over a data split for a trained dense model, saved as RESULTS/gates_<name>.json."""
    import timm
    import torch

    import timm_denseres  # noqa: F401  registers the models
    from timm_denseres.evaluate import make_loader
    from timm_denseres.gate_stats import record_gates

    if args.checkpoint:
        if not args.model:
            sys.exit('error: --checkpoint needs --model NAME (the architecture it was trained as)')
        r = recipe()
        data_cfg = {key: r[key] for key in ('input_size', 'mean', 'std', 'crop_pct', 'interpolation')}
        model = timm.create_model(args.model, num_classes=r['num_classes'], in_chans=r['in_chans'],
                                  pretrained_cfg_overlay=data_cfg)
        with torch.serialization.safe_globals([argparse.Namespace]):  # train.py stores its args in the file
            state = torch.load(args.checkpoint, map_location='cpu', weights_only=True)
        model.load_state_dict(state['state_dict'])
        source, name = f'--checkpoint {args.checkpoint} --model {args.model}', Path(args.checkpoint).parent.name
    else:
        model = timm.create_model(args.gates, pretrained=True)
        source, name = args.gates, Path(args.gates.split(':')[-1]).name
    name = args.name or name
    model.eval()
    loader = make_loader(model, args.data_dir, args.split, batch_size=200)
    with torch.no_grad(), record_gates(model) as stats:
        for images, _ in loader:
            model(images)
    command = (f'python tools/study.py report --gates {source} --data-dir {args.data_dir} --split {args.split}'
               + (f' --name {args.name}' if args.name else ''))
    record = {'command': command, 'split': args.split, 'images': len(loader.dataset),
              'w_mean': stats.w_mean(), 'v_mean': stats.v_mean()}
    if args.gates and args.gates.startswith('local-dir:'):  # the folder's weights may be replaced later
        from timm_denseres.pretrained import folder_sha256
        record['weights_sha256'] = folder_sha256(Path(args.gates[len('local-dir:'):]) / 'config.json')
    path = Path(args.results) / f'gates_{name}.json'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + '\n')
    return path


def replaced_weights_note(record: dict) -> str:
    """Where a gate record's local-dir: folder now holds other weights, which weights it was recorded from."""
    from timm_denseres.pretrained import folder_sha256

    match = re.search(r'--gates local-dir:(\S+)', record['command'])
    recorded = record.get('weights_sha256')
    if not match or not recorded or folder_sha256(Path(match[1]) / 'config.json') == recorded:
        return ''
    return (f' when `{match[1]}` held the weights of sha256 {recorded[:12]}… (it holds others now; '
            f'`git log -- {match[1]}` finds them)')


def _arm(run_name: str) -> str:
    match = RUN_NAME.match(run_name)
    return match['arm'] if match else run_name


def gate_records(results: Path) -> Dict[str, dict]:
    return {p.stem[len('gates_'):]: json.loads(p.read_text()) for p in sorted(results.glob('gates_*.json'))}


def cmd_report(args: argparse.Namespace) -> int:
    results, docs, doc = Path(args.results), Path(args.docs), Path(args.doc)
    if args.gates is not None:
        print(f'wrote {record_gate_json(args)}; run `python tools/study.py report` for the figure')
        return 0
    if not results.is_dir():
        sys.exit(f'error: no results folder {results}')
    runs, gates = load_runs(results), gate_records(results)
    figures = os.path.relpath(docs, doc.parent)
    figures = '' if figures == '.' else figures + '/'
    text = doc.read_text()
    plan_arms = set(yaml.safe_load(Path(args.study_plan).read_text())['arms'])
    in_plan = '<!-- default-table:start -->' in text  # else the plan's runs stay in the study's tables
    default_runs = [r for r in runs if r.arm in plan_arms]
    default_gates = {n: g for n, g in gates.items() if in_plan and _arm(n) in plan_arms}
    if in_plan:
        runs = [r for r in runs if r not in default_runs]
        gates = {n: g for n, g in gates.items() if n not in default_gates}
    block = study_block(runs, gates, figures)
    print(block)
    new_text = replace_block(text, block, doc)
    if in_plan:
        default_block = study_block(default_runs, default_gates, figures, by_epochs=True, curves=DEFAULT_CURVES_PNG)
        print(default_block)
        new_text = replace_block(new_text, default_block, doc, 'default-table')
    card = Path(args.card)
    card_text = card.read_text() if card.is_file() else ''
    new_card_text = card_text
    if '<!-- study-summary:start -->' in card_text:
        new_card_text = replace_block(card_text, summary_block(default_runs, runs), card, 'study-summary')
    if '<!-- ablation-table:start -->' in text + card_text:  # the study's doc, the model card or both
        plan = yaml.safe_load(Path(args.ablation_plan).read_text())
        ablation = ablation_block(plan, [Path(folder) for folder in args.ablation])
        print(ablation)
        if '<!-- ablation-table:start -->' in text:
            new_text = replace_block(new_text, ablation, doc, 'ablation-table')
        if '<!-- ablation-table:start -->' in card_text:
            new_card_text = replace_block(new_card_text, ablation, card, 'ablation-table')
    stale = [path for path, old, new in ((doc, text, new_text), (card, card_text, new_card_text)) if old != new]
    if args.check:
        for path in stale:
            print(f'{path} is out of date: run `python tools/study.py report`', file=sys.stderr)
        return 1 if stale else 0
    if new_text != text:
        doc.write_text(new_text)
    if new_card_text != card_text:
        card.write_text(new_card_text)
    from timm_denseres.gate_figure import plot_gate_weights

    docs.mkdir(parents=True, exist_ok=True)
    if runs:
        plot_curves(runs, docs / CURVES_PNG)
    if in_plan and default_runs:
        plot_curves(default_runs, docs / DEFAULT_CURVES_PNG, by_epochs=True)
    for name, record in {**gates, **default_gates}.items():
        plot_gate_weights(record['w_mean'], str(docs / f'study_gates_{name}.png'),
                          title=f'{name}: mean w_ik over {record["split"]} ({record["images"]} images)')
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument('--results', default=str(RESULTS), help='the records, one folder per run')
    sub = parser.add_subparsers(dest='command', required=True)

    run = sub.add_parser('run', parents=[common], help='train, validate and collect one run')
    run.add_argument('model')
    run.add_argument('--seed', type=int, required=True)
    run.add_argument('--variant-name', default='', help='added to the run name: {model}-{variant}-s{seed}')
    run.add_argument('--model-kwargs', nargs='+', default=[], metavar='KEY=VALUE')
    run.add_argument('--epochs', type=int, help="default: the recipe's")
    run.add_argument('--data-dir', default='data/fashion-mnist-20k')
    run.add_argument('--output', default='runs/study', help="train.py's --output")
    run.add_argument('--threads', type=int, default=1)
    run.add_argument('--device', default='cpu', help="train.py's and validate.py's --device")
    run.add_argument('--resume', action='store_true',
                     help="go on from the run's last.pth.tar (a run that was stopped)")
    run.add_argument('--dry-run', action='store_true', help='print the commands only')
    run.set_defaults(func=cmd_run)

    plan = sub.add_parser('plan', help="every run of a plan (a YAML of arms) that has no records yet")
    plan.add_argument('plan', help='YAML: results (folder), epochs (optional), arms: {name: {model, model_kwargs, '
                      'epochs (optional)}}')
    plan.add_argument('--results', help="default: the plan's")
    plan.add_argument('--seeds', type=int, nargs='+', default=[0])
    plan.add_argument('--arms', nargs='+', help="only these arms, in this order (default: the plan's)")
    plan.add_argument('--jobs', type=int, default=2, help='runs at a time')
    plan.add_argument('--threads', type=int, default=1, help='torch threads per run')
    plan.add_argument('--epochs', type=int, help="default: the plan's, else the recipe's")
    plan.add_argument('--data-dir', default='data/fashion-mnist-20k')
    plan.add_argument('--output', default='runs/study', help="train.py's --output")
    plan.add_argument('--device', default='cpu')
    plan.add_argument('--start-within', type=float, metavar='SECONDS', help='start no run after this many seconds')
    plan.set_defaults(func=cmd_plan)

    collect = sub.add_parser('collect', parents=[common], help='copy the records of finished runs to --results')
    collect.add_argument('run_dirs', nargs='+', metavar='RUN_DIR')
    collect.set_defaults(func=cmd_collect)

    report = sub.add_parser('report', parents=[common], help=f'the tables in {STUDY_DOC}, the figures')
    report.add_argument('--doc', default=str(ROOT / STUDY_DOC), help='the document with the table markers')
    report.add_argument('--ablation', nargs='*', default=[str(ROOT / f) for f in ABLATION_RESULTS],
                        help='results folders of the gate ablation, one table each')
    report.add_argument('--ablation-plan', default=str(ROOT / 'tools' / 'plans' / 'fmnist_gate_ablation.yaml'))
    report.add_argument('--study-plan', default=str(ROOT / STUDY_PLAN),
                        help="the plan of the study under the defaults: its arms' runs go between the document's "
                        "default-table markers, where it has them")
    report.add_argument('--card', default=str(ROOT / 'MODEL_CARD.md'),
                        help="the model card: the study's summary goes between its study-summary markers")
    report.add_argument('--docs', default=str(ROOT / 'docs'), help='where the PNGs go')
    report.add_argument('--check', action='store_true', help='exit 1 if the documents would change')
    report.add_argument('--gates', nargs='?', const='', metavar='MODEL_SPEC',
                        help='record gate weights of a pretrained model spec (or of --checkpoint)')
    report.add_argument('--checkpoint', help="a train.py checkpoint (last.pth.tar); needs --model")
    report.add_argument('--model', help='the architecture of --checkpoint')
    report.add_argument('--data-dir', help='ImageFolder root for --gates')
    report.add_argument('--split', default='validation')
    report.add_argument('--name', help='gates_<name>.json; default: the run folder or model name')
    report.set_defaults(func=cmd_report)

    args = parser.parse_args(argv)
    if args.command in ('run', 'plan'):
        stop_children_on_sigterm()
    if getattr(args, 'gates', None) is not None and not (args.data_dir and (args.gates or args.checkpoint)):
        parser.error('--gates needs --data-dir and a MODEL_SPEC or --checkpoint PATH --model NAME')
    return args.func(args)


if __name__ == '__main__':
    sys.exit(main())
