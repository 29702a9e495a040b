"""tools/gpu_acceptance.py, the parts a CPU can check: its command line, its refusal without CUDA, the plan `--dry-run`
prints, and the budget stopping a run (on the script's hidden CPU plumbing mode). The GPU checks themselves need a GPU."""
import json, os, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / 'tools' / 'gpu_acceptance.py'
CHECKS = ('bench', 'paper', 'nb-epochs', 'nb-topology', 'nb-golf', 'nb-curriculum', 'nb-flm', 'fp8', 'ddp')
NO_GPU = dict(os.environ, CUDA_VISIBLE_DEVICES='')   # torch sees no GPU even on a machine that has one

def tool(*args, env=NO_GPU, timeout=120):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)

def check_lines(out:str) -> list[str]:
    return [l for l in out.splitlines() if l.startswith('[')]

def test_help_names_every_check_and_option():
    r = tool('--help')
    assert r.returncode == 0, r.stderr
    for opt in ('--out', '--only', '--budget-s', '--dry-run'): assert opt in r.stdout
    for name in (*CHECKS, 'notebooks'): assert name in r.stdout
    assert '--worker' not in r.stdout and '--cpu-plumbing' not in r.stdout   # internal switches stay out of the help

def test_unknown_check_is_refused_naming_the_allowed_ones(tmp_path):
    r = tool('--only', 'bench,gpu-burn', '--out', tmp_path / 'out')
    assert r.returncode == 2
    assert "unknown check 'gpu-burn'" in r.stderr
    for name in (*CHECKS, 'notebooks'): assert name in r.stderr.split('allowed:')[1]
    assert not (tmp_path / 'out').exists()

@pytest.mark.parametrize('args, err', [(('--budget-s', '0'), '--budget-s'), (('--steps', '5'), '--steps'),
                                       (('--data', '/no/such/data/root'), '--data')])
def test_bad_values_stop_before_anything_runs(tmp_path, args, err):
    r = tool(*args, '--dry-run', '--out', tmp_path / 'out')
    assert r.returncode == 2 and err in r.stderr and 'usage:' in r.stderr

def test_refuses_without_cuda(tmp_path):
    r = tool('--out', tmp_path / 'out')
    assert r.returncode == 2
    assert r.stdout == ''
    msg = r.stderr.strip()
    assert len(msg.splitlines()) == 1 and msg.startswith('gpu_acceptance: refused') and 'no CUDA GPU' in msg and '--dry-run' in msg
    assert not (tmp_path / 'out').exists()          # refused before writing anything

def test_dry_run_lists_every_check_with_its_command(tmp_path):
    out = tmp_path / 'out'
    r = tool('--dry-run', '--out', out, '--data', tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].startswith('device: no CUDA GPU visible')
    lines = check_lines(r.stdout)
    assert [l.split()[1] for l in lines] == list(CHECKS)          # every check, in the order they run
    cmds = [l.strip()[2:] for l in r.stdout.splitlines() if l.strip().startswith('$ ')]
    assert len(cmds) == len(CHECKS)
    assert 'bench=' not in r.stdout                                 # nothing ran
    assert '--worker bench' in cmds[0] and '"compile": true' in cmds[0] and '"device": "cuda"' in cmds[0]
    assert '--worker paper' in cmds[1] and '"steps": 300' in cmds[1]
    for nb, cmd in zip(('epochs', 'topology', 'golf', 'curriculum', 'flm'), cmds[2:7]):
        assert f'nbs/{nb}.ipynb' in cmd and '-m papermill' in cmd and '-k supra' in cmd
        assert '-p preset smoke' in cmd and '-p device cuda' in cmd and f'-p out_dir {out}/nb/{nb}' in cmd
    assert '--worker fp8' in cmds[7]
    assert 'torch.distributed.run' in cmds[8] and '--nproc_per_node N' in cmds[8]
    assert 'SKIP here' in lines[8]                                  # no GPU here: fewer than two
    assert not out.exists()                                         # a dry run writes nothing

def test_dry_run_only_notebooks(tmp_path):
    r = tool('--dry-run', '--only', 'notebooks', '--out', tmp_path / 'out')
    assert r.returncode == 0, r.stderr
    assert [l.split()[1] for l in check_lines(r.stdout)] == [c for c in CHECKS if c.startswith('nb-')]

def test_dry_run_time_slices_share_the_budget(tmp_path):
    r = tool('--dry-run', '--only', 'bench,paper,fp8', '--budget-s', '300', '--out', tmp_path / 'out')
    assert r.returncode == 0, r.stderr
    slices = [int(l.rsplit('[~', 1)[1].split('s]')[0]) for l in check_lines(r.stdout)]
    assert len(slices) == 3 and slices[0] > slices[1] > slices[2] and abs(sum(slices) - 300) <= 3

def test_a_run_over_budget_stops_failing_and_writes_the_summary(tmp_path):
    "A budget too small for the check: it is not started (or killed at its slice); exit 1, a FAIL line, the JSON summary."
    out = tmp_path / 'out'
    r = tool('--cpu-plumbing', '--only', 'fp8,ddp', '--budget-s', '3', '--out', out)
    assert r.returncode == 1, r.stdout + r.stderr
    fail = [l for l in check_lines(r.stdout) if ' FAIL ' in l]
    assert len(fail) == 1 and fail[0].split()[1] == 'fp8' and 'budget' in fail[0]
    assert 'FAILED at fp8' in r.stdout and '[2/2]' not in r.stdout       # the first failure stops the run
    s = json.loads((out / 'gpu_acceptance.json').read_text())
    assert s['result'] == 'FAIL' and s['failed'] == 'fp8' and s['cpu_plumbing'] is True and s['budget_s'] == 3
    assert [c['name'] for c in s['checks']] == ['fp8'] and s['checks'][0]['status'] == 'FAIL'
