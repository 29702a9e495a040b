#!/usr/bin/env python
"""GPU acceptance run: in one --budget-s (default 480 s) on one CUDA GPU, check that Supra trains fast and correctly there.

    .venv/bin/python tools/gpu_acceptance.py [--out DIR] [--only CHECK,...] [--budget-s 480] [--dry-run]

Checks, in this order (one line each, PASS / FAIL / SKIP and the key numbers; the first FAIL stops the run, exit 1):

  bench          training tokens/s of Supra vs transformers' LlamaForCausalLM with the same shapes (balanced 6x192, vocab
                 8192, batch 64 x 256), bf16 autocast, eager and torch.compile, same process; MFU vs the measured bf16
                 matmul peak; its last line is `bench=train ... tok_s=... ref_tok_s=... ratio=... mfu=...`
  paper          the epochs experiment's `paper` preset trained (supra's trainer, torch.compile) for --steps steps on a
                 random-token pool of the preset's size: tokens/s, peak GPU memory, ETA of the full run's training steps
  nb-<name>      nbs/<name>.ipynb through papermill (kernel `supra`) at `-p preset smoke -p device cuda` (epochs also
                 `-p epochs 2`), one per experiment notebook (epochs, topology, golf, curriculum, flm; `notebooks` selects
                 all five); passes when results.json says complete, on cuda; the four that read wikipedia-en and the
                 evaluation sets need a data root (--data, $SUPRA_DATA, ./shared/data or ../shared/data)
  fp8            20 training steps of the FP8 model beside the bf16 one from the same weights and batches, on a
                 learnable token stream (SKIP below compute capability 8.9)
  ddp            `torchrun --nproc_per_node N -m supra.train` for 20 steps over NCCL (the smoke pool; random tokens
                 through Supra's trainer when no data root is reachable) (SKIP with fewer than 2 GPUs)

Each check runs in its own process, killed at its time slice: the budget left, shared among the checks left by weight
(time a check does not use goes to the ones after it). Without CUDA the script refuses (exit 2), unless --dry-run, which
prints the plan and every command without running anything. A JSON summary goes to OUT/gpu_acceptance.json and each
check's full output to OUT/logs/<check>.log.
"""
from __future__ import annotations
import argparse, json, math, os, shlex, shutil, signal, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve()
NOTEBOOKS = ('epochs', 'topology', 'golf', 'curriculum', 'flm')
NEED_DATA = ('epochs', 'topology', 'golf', 'curriculum')   # read wikipedia-en and the evaluation sets from the data root (flm makes its own)
NB_EXTRA = {'epochs': ('epochs', '2')}
NB_EXTRA_WHY = 'epochs 1..2 as the test suite runs it, not the default 1..8: every stage, 4 checkpoint evaluations instead of 10, within the budget'
CHECKS = {   # name: (weight of the budget, what it checks) — in the order they run; weights ~ expected seconds (notebooks: their wall times in a CPU plumbing run)
    'bench': (18, "training tokens/s, Supra vs transformers' LlamaForCausalLM (bf16 autocast, torch.compile)"),
    'paper': (12, "the epochs experiment's paper preset: tokens/s, peak memory, ETA of the full run"),
    **{f'nb-{n}': (w, f'nbs/{n}.ipynb at the smoke preset on cuda (papermill)') for n, w in zip(NOTEBOOKS, (11, 12, 8, 12, 7))},
    'fp8': (4, 'FP8 training steps beside bf16 (compute capability >= 8.9)'),
    'ddp': (10, 'DDP over NCCL through torchrun (more than one GPU)'),
}
GROUPS = {'notebooks': [f'nb-{n}' for n in NOTEBOOKS]}
RESULT = 'GPU_ACCEPTANCE_RESULT '     # a worker's last line: this prefix, then its result as JSON
MIN_SLICE_S = 10.0                    # a check given less than this is not started: the budget is spent
KILL_MARGIN_S = 5.0                   # kept back from each slice: the time a killed check takes to go down
FP8_CAPABILITY = (8, 9)
BENCH_BATCH, BENCH_SEQ = 64, 256      # the paper preset's batch of sequences
TRAIN_CLI = 'supra.train'             # `python -m supra.train`: the trainer's command line, under torchrun too


# ------------------------------------------------------------------------------------------------------------ workers
# Each worker runs in its own process (`--worker NAME`), imports Supra there, and ends with one RESULT line.

def _emit(res:dict):
    print(RESULT + json.dumps(res, default=str), flush=True)

def _jemalloc():
    "Preload jemalloc as Supra's own commands do (a re-exec, at most once)."
    from supra.train.runtime import reexec_with_jemalloc
    reexec_with_jemalloc()

def worker_probe(a:dict) -> dict:
    "The device: GPU name, memory, capability, count, torch/CUDA/cuDNN/driver versions."
    import platform, torch
    r = dict(python=platform.python_version(), torch=torch.__version__, cuda_build=torch.version.cuda, cuda=torch.cuda.is_available(), gpus=0)
    if r['cuda']:
        p = torch.cuda.get_device_properties(0)
        r.update(gpus=torch.cuda.device_count(), gpu=p.name, memory_gib=round(p.total_memory / 2**30, 1),
                 capability=[p.major, p.minor], cudnn=torch.backends.cudnn.version())
        try:
            q = subprocess.run(['nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader'], capture_output=True, text=True, timeout=10)
            r['driver'] = q.stdout.strip().splitlines()[0] if q.returncode == 0 and q.stdout.strip() else None
        except (OSError, subprocess.TimeoutExpired): r['driver'] = None
    return r

def _hf_llama(cfg):
    "transformers' LlamaForCausalLM with the shapes of Supra's `cfg` (as the training benchmark builds it)."
    from transformers import LlamaConfig, LlamaForCausalLM
    hc = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.hidden, num_hidden_layers=cfg.n_layer,
                     num_attention_heads=cfg.n_head, num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.seq_len,
                     rms_norm_eps=cfg.norm_eps, rope_parameters=dict(rope_type='default', rope_theta=cfg.rope_theta),
                     tie_word_embeddings=True, attention_bias=False, mlp_bias=False, attn_implementation='sdpa')
    return LlamaForCausalLM(hc)

def worker_bench(a:dict):
    """`python -m supra.bench train`'s measurement on the GPU: the same two models, same shapes, same process, sides
    alternated over rounds; here with bf16 autocast and a CUDA synchronize around every timing. Prints its table and,
    last, the bench's `bench=train key=value` line."""
    import contextlib, torch
    from supra.core.config import ModelConfig
    from supra.model.transformer import Transformer
    from supra.train.runtime import loss_kwargs, train_flops_per_token
    dev, steps, rounds, bs, T, comp = a['device'], a['steps'], a['rounds'], a['batch'], a['seq_len'], a['compile']
    cuda = dev == 'cuda'
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    amp = (lambda: torch.autocast('cuda', dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    torch.manual_seed(0)
    cfg = ModelConfig.named('balanced', vocab_size=8192, seq_len=T)
    sup, ref = Transformer(cfg).to(dev), _hf_llama(cfg).to(dev)
    n_sup, n_ref = sup.n_params(), sum(p.numel() for p in ref.parameters())
    assert n_sup == n_ref, f'parameter counts differ: Supra {n_sup:,} vs LlamaForCausalLM {n_ref:,}'
    x = torch.randint(0, cfg.vocab_size, (bs, T + 1), device=dev)
    x, y = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    losses = {}
    def stepper(name, model, hf):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
        kw = {} if hf else loss_kwargs(model)
        def run(n):
            sync(); t = time.perf_counter()
            for _ in range(n):
                with amp(): loss = model(input_ids=x, labels=x).loss if hf else model(x, y, **kw)[1]
                loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
            sync(); losses[name] = float(loss.detach().float())
            return (time.perf_counter() - t) / n
        return run
    sides = dict(supra=stepper('supra', sup, False), hf=stepper('hf', ref, True))
    if comp: sides.update(supra_c=stepper('supra_c', torch.compile(sup), False), hf_c=stepper('hf_c', torch.compile(ref), True))
    t0 = time.perf_counter()
    for run in sides.values(): run(1)                      # warm-up, and compilation where asked, before any timing
    warm_s = time.perf_counter() - t0
    times = {k: [] for k in sides}
    for _ in range(rounds):                                # alternate: noise hits every side alike
        for k, run in sides.items(): times[k].append(run(steps))
    tps = {k: bs * T / min(v) for k, v in times.items()}
    n = 8192 if cuda else 1024                             # the matmul peak: bf16 on the GPU (fp32 on a CPU)
    dt = torch.bfloat16 if cuda else torch.float32
    A, B = torch.randn(n, n, device=dev, dtype=dt), torch.randn(n, n, device=dev, dtype=dt)
    torch.mm(A, B); sync(); best = float('inf')
    for _ in range(10):
        t = time.perf_counter(); torch.mm(A, B); sync(); best = min(best, time.perf_counter() - t)
    peak = 2 * n ** 3 / best
    fpt = train_flops_per_token(cfg, T)
    mfu = max(tps['supra'], tps.get('supra_c', 0)) * fpt / peak
    print(f"{torch.cuda.get_device_name(0) if cuda else 'CPU'}, torch {torch.__version__}, "
          f"{'bf16 autocast' if cuda else 'fp32'}, batch {bs} x {T}, {steps} steps x {rounds} rounds, warm-up/compile {warm_s:.1f}s")
    for k in sides:
        print(f"  {k:<8} {tps[k]:>12,.0f} tokens/s   loss {losses[k]:.4f}   ({', '.join(f'{t * 1e3:.2f}' for t in times[k])} ms/step)")
    bad = [k for k, v in losses.items() if not math.isfinite(v)]
    assert not bad, f'non-finite training loss on {bad}: {losses}'
    extra = ''
    if comp:
        extra = (f" tok_s_compiled={round(tps['supra_c'])} ref_tok_s_compiled={round(tps['hf_c'])}"
                 f" ratio_compiled={tps['supra_c'] / tps['hf_c']:.3f} ratio_compiled_vs_eager_hf={tps['supra_c'] / tps['hf']:.3f}")
    print(f"bench=train config=balanced device={dev} dtype={'bf16' if cuda else 'fp32'} batch={bs} seq_len={T} params={n_sup} "
          f"tok_s={round(tps['supra'])} ref_tok_s={round(tps['hf'])} ratio={tps['supra'] / tps['hf']:.3f}{extra} "
          f"mfu={mfu:.3f} peak_tflops={peak / 1e12:.1f} warmup_s={warm_s:.1f}", flush=True)

def _random_pool(n:int, vocab:int, seed:int=0):
    import numpy as np
    return np.random.default_rng(seed).integers(0, vocab, n, dtype=np.uint16 if vocab <= 65536 else np.uint32)

def worker_paper(a:dict) -> dict:
    """The epochs experiment's paper plan (`plan(preset='paper')`), its model and training configs trained by Supra's
    trainer for `steps` steps on a random-token pool of the plan's size (throughput does not depend on the tokens); the
    full run's training steps from the trainer's own epoch plan, timed at the measured steady step time."""
    import numpy as np, torch
    from supra.experiments.epochs.run import plan as epochs_plan
    from supra.train.trainer import train, epochs_run_plan
    from supra.train.runlog import RunLog
    dev, steps, out = a['device'], a['steps'], Path(a['dir'])
    shutil.rmtree(out, ignore_errors=True)
    p = epochs_plan(preset='paper', device=dev, out_dir=str(out / 'plan'), paper=str(out / 'plan' / 'epochs.html'))
    U, bs, T = p.data.n_tokens, a.get('batch') or p.train.batch_size, p.train.seq_len   # `batch`: CPU plumbing only
    pool = _random_pool(U, p.model.vocab_size)
    tc = p.train.replace(batch_size=bs, tokens=steps * bs * T, compile=a['compile'], ckpt_every_s=1e9, log_every=1)
    if dev == 'cuda': torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    res = train(pool, p.model, tc, out / 'run', quiet=True)
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if dev == 'cuda' else None
    reserved = torch.cuda.max_memory_reserved() if dev == 'cuda' else None
    log = RunLog(out / 'run'); log.poll()
    _, tok_s = log.series('tok_s'); _, loss = log.series('loss')
    skip = max(10, len(tok_s) // 10)                      # the first steps compile and allocate: not the steady state
    steady = tok_s[skip:] if len(tok_s) > skip + 5 else tok_s[1:]
    step_s = float(np.mean(bs * T / steady))             # mean step time: what a long run pays per step
    spe = res['steps_per_epoch']
    rep = epochs_run_plan(spe, p.epochs, p.train.cooldown_frac)['total_steps']
    fresh = epochs_run_plan(spe, p.fresh_pools, p.train.cooldown_frac)['total_steps'] - spe if p.fresh_pools else 0  # its first epoch is shared
    full = len(p.seeds) * (rep + fresh)
    return dict(steps=res['step'], tokens=res['tokens'], wall_s=wall, train_s=res['train_s'], tok_s=bs * T / step_s,
                tok_s_median=float(np.median(steady)), step_ms=step_s * 1e3, loss_first=float(loss[0]), loss_last=float(loss[-1]),
                finite=bool(np.isfinite(loss).all()), peak_mem_gib=None if peak is None else peak / 2**30,
                reserved_gib=None if reserved is None else reserved / 2**30, compiled=a['compile'],
                model=dict(n_layer=p.model.n_layer, d_model=p.model.d_model, vocab=p.model.vocab_size), batch=bs, seq_len=T,
                pool_tokens=U, steps_per_epoch=spe, epochs=p.epochs, fresh_pools=p.fresh_pools, seeds=list(p.seeds),
                full_run_steps=full, full_run_tokens=full * bs * T, eta_s=full * step_s)

def worker_fp8(a:dict) -> dict:
    """The FP8 model (every block linear through torch._scaled_mm) and the bf16 model from the same initial weights,
    trained side by side on the same batches of a learnable (periodic) token stream."""
    import contextlib, numpy as np, torch
    from supra.core.config import preset
    from supra.model.transformer import Transformer
    from supra.model.fp8 import fp8_support, fp8_config, Fp8Transformer
    from supra.train.runtime import loss_kwargs
    dev, steps, bs = a['device'], a['steps'], a['batch']
    s = fp8_support(dev)
    if not s.available and not a.get('plumbing'): return dict(available=False, reason=s.reason)
    cuda = dev == 'cuda'
    cfg = preset('paper', dev).model
    T = cfg.seq_len
    torch.manual_seed(0)
    base = Transformer(cfg).to(dev)
    f8 = Fp8Transformer(fp8_config(cfg)).to(dev); f8.load_state_dict(base.state_dict())
    rng = np.random.default_rng(0)
    stream = np.tile(rng.integers(0, cfg.vocab_size, 512), 64)    # a 512-token cycle: learnable within a few steps
    starts = rng.integers(0, len(stream) - T - 1, (steps, bs))
    batches = [torch.from_numpy(np.stack([stream[i:i + T + 1] for i in row]).astype(np.int64)) for row in starts]
    amp = (lambda: torch.autocast('cuda', dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    out = {}
    for name, m in (('bf16' if cuda else 'fp32', base), ('fp8', f8)):
        opt, kw, losses = torch.optim.AdamW(m.parameters(), lr=3e-3, betas=(0.9, 0.95), fused=cuda), loss_kwargs(m), []
        sync(); t = time.perf_counter()
        for b in batches:
            b = b.to(dev); x, y = b[:, :-1], b[:, 1:]
            with amp(): loss = m(x, y, **kw)[1]
            loss.backward(); torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0); opt.step(); opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach().float()))
        sync(); out[name] = dict(losses=losses, step_ms=(time.perf_counter() - t) / steps * 1e3)
    ref, tail = out['bf16' if cuda else 'fp32'], max(1, steps // 5)   # `last`: the mean over the last fifth of the steps
    return dict(available=True, reason=s.reason, n_fp8=f8.n_fp8, steps=steps, batch=bs, ref=('bf16' if cuda else 'fp32'),
                ref_first=ref['losses'][0], ref_last=float(np.mean(ref['losses'][-tail:])),
                fp8_first=out['fp8']['losses'][0], fp8_last=float(np.mean(out['fp8']['losses'][-tail:])),
                finite=all(math.isfinite(v) for o in out.values() for v in o['losses']),
                ref_step_ms=ref['step_ms'], fp8_step_ms=out['fp8']['step_ms'])

def worker_ddp(a:dict) -> dict|None:
    "Under torchrun: the paper model trained by Supra's trainer on a random-token pool for a few steps; rank 0 reports."
    import torch.distributed as dist
    from supra.core.config import preset
    from supra.train.trainer import train
    p, steps = preset('paper', a['device']), a['steps']
    world = int(os.environ.get('WORLD_SIZE', '1'))
    bs, T = a['per_rank'] * world, p.train.seq_len         # `per_rank` sequences per rank
    tc = p.train.replace(batch_size=bs, tokens=steps * bs * T, compile=False, ckpt_every_s=1e9, device=a['device'])
    try:
        res = train(_random_pool(2_000_000, p.model.vocab_size), p.model, tc, a['dir'], quiet=True)
    finally:
        if dist.is_initialized(): dist.destroy_process_group()
    if int(os.environ.get('RANK', '0')) == 0: print(json.dumps(dict(result=res, world_size=world), default=str), flush=True)
    return None

WORKERS = dict(probe=worker_probe, bench=worker_bench, paper=worker_paper, fp8=worker_fp8, ddp=worker_ddp)

def run_worker(name:str, args_json:str) -> int:
    a = json.loads(args_json or '{}')
    if name != 'probe': _jemalloc()
    res = WORKERS[name](a)
    if res is not None: _emit(res)
    return 0


# ------------------------------------------------------------------------------------------------------------ checks
def _worker_cmd(name:str, **a) -> list[str]:
    return [sys.executable, str(THIS), '--worker', name, '--worker-args', json.dumps(a, sort_keys=True)]

def _notebook(name:str) -> Path:
    p = ROOT / 'nbs' / f'{name}.ipynb'
    if p.exists(): return p
    found = sorted((ROOT / 'nbs').rglob(f'{name}.ipynb'))
    return found[0] if found else p

def plan_checks(ctx:dict) -> list[dict]:
    "Every selected check: its command, or why it is skipped here."
    dev, out, plumb = ctx['device'], ctx['out'], ctx['plumbing']
    gpus, cap = ctx['probe'].get('gpus') or 0, tuple(ctx['probe'].get('capability') or ())
    plan = []
    for name in ctx['only']:
        c = dict(name=name, weight=CHECKS[name][0], what=CHECKS[name][1], skip=None, fail=None, cmd=None, notes=[])
        if name == 'bench':
            c['cmd'] = _worker_cmd('bench', device=dev, steps=2 if plumb else 20, rounds=1 if plumb else 3,
                                   batch=8 if plumb else BENCH_BATCH, seq_len=BENCH_SEQ, compile=not plumb)
        elif name == 'paper':
            c['cmd'] = _worker_cmd('paper', device=dev, steps=ctx['steps'], compile=not plumb, dir=str(out / 'paper'),
                                   **(dict(batch=8) if plumb else {}))
            c['notes'].append('pool: random tokens (uniform over the vocabulary), the preset\'s 20,000,000 tokens: a throughput '
                              'measurement that needs no data root' + ('' if ctx['data'] else ' (none is reachable here)'))
        elif name.startswith('nb-'):
            nb = name[3:]
            d = out / 'nb' / nb
            c['cmd'] = [sys.executable, '-m', 'papermill', '--no-progress-bar', '--cwd', str(ROOT), '-k', 'supra',
                        str(_notebook(nb)), str(out / 'nb' / f'{nb}.ipynb'), '-p', 'preset', 'smoke', '-p', 'device', dev,
                        '-p', 'out_dir', str(d), '-p', 'paper', str(d / f'{nb}.html')]
            if nb in NB_EXTRA:
                c['cmd'] += ['-p', *NB_EXTRA[nb]]
                c['notes'].append(f"-p {' '.join(NB_EXTRA[nb])}: " + NB_EXTRA_WHY)
            c['dir'] = str(d)
            if nb in NEED_DATA and not ctx['data']:
                c['fail'] = ('needs a data root (wikipedia-en and the evaluation sets, the layout of shared/data) and none is reachable: '
                             'pass --data DIR or set SUPRA_DATA')
        elif name == 'fp8':
            if not plumb and cap and cap < FP8_CAPABILITY:
                c['skip'] = f"compute capability {cap[0]}.{cap[1]} < {FP8_CAPABILITY[0]}.{FP8_CAPABILITY[1]}: no FP8 tensor cores"
            c['cmd'] = _worker_cmd('fp8', device=dev, steps=10 if plumb else 20, batch=2 if plumb else 32, plumbing=plumb)
        elif name == 'ddp':
            n = 2 if plumb else gpus
            if not plumb and n < 2: c['skip'] = f"{n} GPU{'s' if n != 1 else ''} visible: DDP needs more than one"
            num = (lambda k: str(k * n)) if n >= 2 else (lambda k: f'{k}xN' if k != 1 else 'N')   # N: the GPUs of the machine that runs it
            run = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', num(1)]
            d = out / 'ddp' / 'run'
            if ctx['data'] and (Path(ctx['data']) / 'wikipedia-en').is_dir():   # the public entry point, on the smoke pool
                steps, per = 20, 16
                c['cmd'] = [*run, '-m', TRAIN_CLI, '--preset', 'smoke', '--device', dev,
                            '--out_dir', str(d), '--batch_size', num(per), '--tokens', num(steps * per * 64), '--quiet']
                c['notes'].append('data: the smoke preset\'s pool from the data root')
            else:
                steps = 5 if plumb else 20
                c['cmd'] = [*run, *_worker_cmd('ddp', device=dev, steps=steps, per_rank=2 if plumb else 32, dir=str(d))[1:]]
                c['notes'].append('data: random tokens (no data root with wikipedia-en reachable)')
            c['expect_steps'], c['expect_world'], c['dir'] = steps, n, str(d)
        plan.append(c)
    return plan

def _last_result(text:str) -> dict|None:
    for line in reversed(text.splitlines()):
        if line.startswith(RESULT): return json.loads(line[len(RESULT):])
    return None

def _last_kv(text:str, prefix:str) -> dict|None:
    "The last `key=value ...` line starting with `prefix` (e.g. 'bench=train'), values as numbers where they are."
    for line in reversed(text.splitlines()):
        if line.startswith(prefix):
            kv = {}
            for tok in line.split():
                if '=' not in tok: continue
                k, v = tok.split('=', 1)
                try: kv[k] = int(v)
                except ValueError:
                    try: kv[k] = float(v)
                    except ValueError: kv[k] = v
            return kv
    return None

def _finite(*vs) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in vs)

def _num(v, fmt:str='.1f') -> str:
    return format(v, fmt) if _finite(v) else '?'

def _dur(s:float) -> str:
    return f'{s:.0f}s' if s < 120 else (f'{s / 60:.1f}min' if s < 7200 else f'{s / 3600:.1f}h')

def judge(c:dict, ctx:dict, rc:int, text:str) -> tuple[str, str, dict]:
    "(PASS/FAIL/SKIP, the key numbers as one string, the numbers) from a check's exit status and output."
    name = c['name']
    if name == 'bench':
        kv = _last_kv(text, 'bench=train')
        if rc != 0 or kv is None: return 'FAIL', f'exit {rc}, no bench=train line', kv or {}
        r = kv.get('ratio_compiled', kv.get('ratio'))
        keys = ('tok_s', 'ref_tok_s', 'ratio', 'tok_s_compiled', 'ref_tok_s_compiled', 'ratio_compiled', 'mfu', 'peak_tflops', 'warmup_s')
        s = f"config={kv.get('config')} {kv.get('dtype')} batch={kv.get('batch')}x{kv.get('seq_len')} " + ' '.join(f'{k}={kv[k]}' for k in keys if k in kv)
        if not _finite(kv.get('tok_s'), kv.get('ref_tok_s'), r): return 'FAIL', s + ' (a non-numeric result)', kv
        if r < ctx['min_ratio']: return 'FAIL', s + f" (Supra/LlamaForCausalLM {r} < --min-ratio {ctx['min_ratio']})", kv
        return 'PASS', s, kv
    if name == 'paper':
        r = _last_result(text)
        if rc != 0 or r is None: return 'FAIL', f'exit {rc}, no result', r or {}
        mem = 'n/a (CPU)' if r['peak_mem_gib'] is None else f"{r['peak_mem_gib']:.2f}GiB (reserved {r['reserved_gib']:.2f}GiB)"
        s = (f"{r['model']['n_layer']}x{r['model']['d_model']} vocab {r['model']['vocab']} batch {r['batch']}x{r['seq_len']} "
             f"{'compiled ' if r['compiled'] else ''}steps={r['steps']} tok_s={r['tok_s']:,.0f} (median {r['tok_s_median']:,.0f}) "
             f"step_ms={r['step_ms']:.2f} peak_mem={mem} loss={r['loss_first']:.3f}->{r['loss_last']:.3f} "
             f"ETA full run={_dur(r['eta_s'])} ({r['full_run_steps']:,} training steps: {len(r['seeds'])} seeds x (epochs 1..{r['epochs']} "
             f"+ fresh control to {r['fresh_pools']} pools), {r['full_run_tokens'] / 1e9:.2f}B tokens; training only, no evaluation) "
             f"data=random tokens, {r['pool_tokens']:,}-token pool (throughput only)")
        ok = r['finite'] and r['steps'] == ctx['steps'] and _finite(r['tok_s'], r['eta_s']) and r['tok_s'] > 0
        return ('PASS' if ok else 'FAIL'), s + ('' if ok else ' (non-finite loss or fewer steps than asked)'), r
    if name.startswith('nb-'):
        res = Path(c['dir']) / 'results.json'
        if rc != 0: return 'FAIL', f'papermill exit {rc}', {}
        if not res.exists(): return 'FAIL', f'no {res}', {}
        env = json.loads(res.read_text())
        state, device = (env.get('status') or {}).get('state'), (env.get('environment') or {}).get('device')
        comp = env.get('compute') or {}
        extra = f"-p {' '.join(NB_EXTRA[name[3:]])} " if name[3:] in NB_EXTRA else ''
        s = f"smoke {extra}state={state} device={device} train_s={_num(comp.get('train_s'))} results={res}"
        if state != 'complete': return 'FAIL', s + " (status.state is not 'complete')", env
        if device != ctx['device']: return 'FAIL', s + f" (ran on {device}, not {ctx['device']})", env
        return 'PASS', s, dict(state=state, device=device, compute=comp)
    if name == 'fp8':
        r = _last_result(text)
        if rc != 0 or r is None: return 'FAIL', f'exit {rc}, no result', r or {}
        if not r['available']: return 'FAIL', f"FP8 unavailable on a GPU of capability >= 8.9: {r['reason']}", r
        d0 = abs(r['fp8_first'] - r['ref_first']) / abs(r['ref_first'])     # same weights, same batch: quantisation alone
        d1 = r['fp8_last'] - r['ref_last']                                    # after training: FP8 may not lag far behind
        s = (f"{r['n_fp8']} FP8 linears, {r['steps']} steps of {r['batch']}x256 on a learnable stream: loss {r['ref']} "
             f"{r['ref_first']:.3f}->{r['ref_last']:.3f}, fp8 {r['fp8_first']:.3f}->{r['fp8_last']:.3f} (first step {d0:.2%} apart, "
             f"last-fifth mean {d1:+.3f} nats); step_ms {r['ref']} {r['ref_step_ms']:.1f} fp8 {r['fp8_step_ms']:.1f} (eager)")
        why = [w for w, bad in (('non-finite loss', not r['finite']), ('no FP8 linear', r['n_fp8'] < 1),
                                ('the fp8 loss did not fall', not r['fp8_last'] < r['fp8_first'] - 0.5),
                                (f'first-step loss {d0:.2%} from {r["ref"]}\'s (> 2%)', d0 > 0.02),
                                (f'fp8 ends {d1:+.3f} nats above {r["ref"]} (> max(0.1, 10%))', d1 > max(0.1, 0.1 * r['ref_last']))) if bad]
        return ('FAIL', s + ' (' + '; '.join(why) + ')', r) if why else ('PASS', s, r)
    if name == 'ddp':
        r = None
        for line in reversed(text.splitlines()):
            if line.startswith('{"result"'): r = json.loads(line); break
        if rc != 0 or r is None: return 'FAIL', f'torchrun exit {rc}, no result', r or {}
        res = r['result']
        meta = Path(res['checkpoint']) / 'meta.json'
        world = json.loads(meta.read_text()).get('world_size') if meta.exists() else r.get('world_size')
        backend = 'gloo' if ctx['device'] == 'cpu' else 'nccl'
        s = f"world_size={world} ({backend}) steps={res['step']} loss={res['loss']:.4f} train_s={res['train_s']:.1f}"
        ok = world == c['expect_world'] and res['step'] == c['expect_steps'] and _finite(res['loss'])
        return ('PASS' if ok else 'FAIL'), s + ('' if ok else f" (expected world_size={c['expect_world']}, steps={c['expect_steps']}, a finite loss)"), r
    raise KeyError(name)


# ------------------------------------------------------------------------------------------------------------ driver
def _run(cmd:list[str], log:Path, env:dict, timeout:float) -> tuple[int|None, float]:
    "Run `cmd` in its own process group, output to `log`; kill the group at `timeout`. (exit status or None, seconds)."
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(log, 'w') as f:
        f.write('$ ' + shlex.join(cmd) + '\n'); f.flush()
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try: rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(p); rc = None
        except BaseException:                                   # Ctrl-C: take the check's processes down with us
            _kill_tree(p, grace=0); raise
    return rc, time.monotonic() - t0

def _descendants(pid:int) -> list[int]:
    "Every live process below `pid` (from /proc), a Jupyter kernel in its own session included."
    kids = {}
    for d in Path('/proc').iterdir():
        if not d.name.isdigit(): continue
        try: ppid = int((d / 'stat').read_text().rsplit(')', 1)[1].split()[1])
        except (OSError, ValueError, IndexError): continue
        kids.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for k in kids.get(todo.pop(), []): out.append(k); todo.append(k)
    return out

def _kill_tree(p:subprocess.Popen, grace:float=3):
    "SIGTERM, then SIGKILL, to the check's process group and every process it started (by id)."
    pids = _descendants(p.pid)
    for sig in ((signal.SIGTERM, signal.SIGKILL) if grace else (signal.SIGKILL,)):
        for f, x in ((os.killpg, p.pid), *((os.kill, q) for q in pids)):
            try: f(x, sig)
            except (ProcessLookupError, PermissionError): pass
        try: p.wait(timeout=grace or 5)
        except subprocess.TimeoutExpired: pass
        if sig == signal.SIGTERM:
            time.sleep(1)
            if p.poll() is not None and not any(Path(f'/proc/{q}').exists() for q in pids): return

def _env(ctx:dict) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', TRANSFORMERS_OFFLINE='1', PYTHONUNBUFFERED='1',
               SUPRA_CACHE=str(ctx['out'] / 'cache'))
    if ctx['data']: env['SUPRA_DATA'] = str(ctx['data'])
    env['PATH'] = os.pathsep.join([str(Path(sys.executable).parent), env.get('PATH', '')])
    return env

def find_data(given:str|None) -> tuple[Path|None, str]:
    "The data root the checks get as SUPRA_DATA (layout of shared/data), and where it came from."
    cands = [(given, '--data')] if given else []
    cands += [(os.environ.get('SUPRA_DATA'), '$SUPRA_DATA'), (str(ROOT / 'shared' / 'data'), 'the repo\'s shared/data'),
              (str(ROOT.parent / 'shared' / 'data'), '../shared/data')]
    for p, src in cands:
        if p and Path(p).is_dir(): return Path(p).resolve(), src
    return None, 'none reachable ($SUPRA_DATA unset; no shared/data in or beside the repo)'

def probe(timeout:float=120) -> dict:
    "The device facts, from a subprocess (this process never initialises CUDA: no context of its own on the GPU)."
    r = subprocess.run(_worker_cmd('probe'), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    res = _last_result(r.stdout)
    if r.returncode != 0 or res is None:
        sys.exit(f"gpu_acceptance: could not probe the device (exit {r.returncode}): {(r.stderr or r.stdout).strip()[-1500:]}")
    return res

def device_line(p:dict) -> str:
    if not p.get('cuda'):
        return (f"device: no CUDA GPU visible (torch {p['torch']}, " +
                (f"built for CUDA {p['cuda_build']}" if p.get('cuda_build') else 'a CPU-only build') + f", python {p['python']})")
    cap = p['capability']
    return (f"device: {p['gpu']} x{p['gpus']}, {p['memory_gib']} GiB, compute capability {cap[0]}.{cap[1]}, torch {p['torch']}, "
            f"CUDA {p['cuda_build']}, cuDNN {p.get('cudnn')}, driver {p.get('driver') or '?'}, python {p['python']}")

def parse_only(s:str) -> list[str]:
    names, allowed = [], [*CHECKS, *GROUPS]
    for n in (x.strip() for x in s.split(',')):
        if not n: continue
        if n not in allowed:
            raise argparse.ArgumentTypeError(f"unknown check {n!r}; allowed: {', '.join(allowed)}")
        names += GROUPS.get(n, [n])
    if not names: raise argparse.ArgumentTypeError(f"no check named; allowed: {', '.join(allowed)}")
    return names

def arg_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog='tools/gpu_acceptance.py', formatter_class=argparse.RawDescriptionHelpFormatter,
                                 description=__doc__.split('\n\n')[0],
                                 epilog='checks, in the order they run:\n' + '\n'.join(f'  {k:<14} {w}' for k, (_, w) in CHECKS.items())
                                        + "\n  notebooks      every nb-* check")
    ap.add_argument('--out', default=str(ROOT / 'outputs' / 'gpu_acceptance'), help='output folder: gpu_acceptance.json, logs/, runs (default outputs/gpu_acceptance)')
    ap.add_argument('--only', type=parse_only, default=list(CHECKS), metavar='CHECK,...', help='run only these checks (comma-separated names; default: all)')
    ap.add_argument('--budget-s', type=float, default=480.0, help='total wall-clock budget in seconds; a check that would pass it is killed and fails (default 480)')
    ap.add_argument('--dry-run', action='store_true', help='print the plan of checks and their commands; run nothing (needs no GPU)')
    ap.add_argument('--data', default=None, help='data root (layout of shared/data) for the notebooks; default $SUPRA_DATA, ./shared/data, ../shared/data')
    ap.add_argument('--steps', type=int, default=300, help='training steps of the paper check (default 300)')
    ap.add_argument('--min-ratio', type=float, default=0.8, help="bench fails below this Supra / LlamaForCausalLM tokens/s ratio (compiled; default 0.8)")
    ap.add_argument('--worker', choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument('--worker-args', default='{}', help=argparse.SUPPRESS)
    ap.add_argument('--cpu-plumbing', action='store_true', help=argparse.SUPPRESS)   # develop the script on a CPU: not an acceptance
    return ap

def main(argv=None) -> int:
    t_start = time.monotonic()
    ap = arg_parser()
    a = ap.parse_args(argv)
    if a.worker: return run_worker(a.worker, a.worker_args)
    if a.budget_s <= 0: ap.error('--budget-s must be > 0')
    if a.steps < 20: ap.error('--steps must be >= 20 (the first steps compile; the steady state needs more)')
    if a.data and not Path(a.data).is_dir(): ap.error(f'--data {a.data}: not a directory')
    only = [n for n in CHECKS if n in set(a.only)]
    p = probe()
    if not p.get('cuda') and not (a.dry_run or a.cpu_plumbing):
        print(f"gpu_acceptance: refused — no CUDA GPU is visible here (torch {p['torch']}, "
              f"{'CUDA ' + p['cuda_build'] if p.get('cuda_build') else 'a CPU-only build'}); run it on a machine with an NVIDIA GPU, "
              f"or pass --dry-run to print the plan.", file=sys.stderr)
        return 2
    data, data_src = find_data(a.data)
    plumb = a.cpu_plumbing and not p.get('cuda')
    ctx = dict(out=Path(a.out).resolve(), only=only, device='cpu' if plumb else 'cuda', plumbing=plumb, probe=p, data=data,
               steps=20 if plumb else a.steps, min_ratio=a.min_ratio)
    plan = plan_checks(ctx)
    print(device_line(p), flush=True)
    if plumb: print('CPU PLUMBING RUN: exercises the script on a CPU; none of its numbers is a GPU acceptance result', flush=True)
    print(f"data root: {data or '-'} ({data_src}); out: {ctx['out']}; budget {a.budget_s:.0f}s", flush=True)
    if a.dry_run:
        runnable = sum(c['weight'] for c in plan if not c['skip'])
        print(f"dry run: {len(plan)} checks, nothing is run; time slices as shares of the {a.budget_s:.0f}s budget (unused time passes on)")
        for i, c in enumerate(plan, 1):
            share = ('SKIP here: ' + c['skip'] if c['skip'] else 'would FAIL here: ' + c['fail'] if c['fail']
                     else f"~{a.budget_s * c['weight'] / runnable:.0f}s")
            print(f"[{i}/{len(plan)}] {c['name']:<14} {c['what']} [{share}]")
            for n in c['notes']: print(f"      {n}")
            print(f"      $ {shlex.join(c['cmd'])}")
        return 0

    out = ctx['out']; out.mkdir(parents=True, exist_ok=True)
    for sub in ('logs', 'cache', 'nb', 'paper', 'ddp'): shutil.rmtree(out / sub, ignore_errors=True)   # a fresh, cold run
    env, deadline = _env(ctx), t_start + a.budget_s
    summary = dict(tool='tools/gpu_acceptance.py', started=time.strftime('%Y-%m-%d %H:%M:%S %Z'), argv=sys.argv[1:], budget_s=a.budget_s,
                   device=p, cpu_plumbing=plumb, data_root=str(data) if data else None, data_source=data_src, out=str(out), checks=[])
    def finish(result:str, failed:str|None=None) -> int:
        summary.update(result=result, failed=failed, elapsed_s=round(time.monotonic() - t_start, 1), finished=time.strftime('%Y-%m-%d %H:%M:%S %Z'))
        (out / 'gpu_acceptance.json').write_text(json.dumps(summary, indent=1, default=str))
        return 0 if result == 'PASS' else 1
    left = sum(c['weight'] for c in plan if not c['skip'])
    for i, c in enumerate(plan, 1):
        tag = f"[{i}/{len(plan)}] {c['name']:<14}"
        rec = dict(name=c['name'], command=shlex.join(c['cmd']), notes=c['notes'])
        if c['skip']:
            print(f"{tag} SKIP  {c['skip']}", flush=True)
            summary['checks'].append(dict(rec, status='SKIP', message=c['skip'])); continue
        if c['fail']:
            print(f"{tag} FAIL  {c['fail']}", flush=True)
            summary['checks'].append(dict(rec, status='FAIL', message=c['fail']))
            print(f"gpu_acceptance: FAILED at {c['name']}: {c['fail']}", flush=True)
            return finish('FAIL', c['name'])
        remaining = deadline - time.monotonic()
        slice_s = (remaining - KILL_MARGIN_S) * c['weight'] / left; left -= c['weight']
        if slice_s < MIN_SLICE_S:
            msg = f"budget spent: {remaining:.0f}s of --budget-s {a.budget_s:.0f} left for this and the checks after it"
            print(f"{tag} FAIL  {msg}", flush=True)
            summary['checks'].append(dict(rec, status='FAIL', message=msg))
            print(f"gpu_acceptance: FAILED at {c['name']}: {msg}", flush=True)
            return finish('FAIL', c['name'])
        if c['name'].startswith('nb-'):
            shutil.rmtree(c['dir'], ignore_errors=True); (out / 'nb').mkdir(parents=True, exist_ok=True)
        log = out / 'logs' / f"{c['name']}.log"
        rc, secs = _run(c['cmd'], log, env, slice_s)
        text = log.read_text(errors='replace')
        if rc is None:
            status, msg, nums = 'FAIL', f"killed at its time slice of {slice_s:.0f}s (--budget-s {a.budget_s:.0f})", {}
        else:
            try: status, msg, nums = judge(c, ctx, rc, text)
            except Exception as e: status, msg, nums = 'FAIL', f'unreadable result ({type(e).__name__}: {e})', {}
        print(f"{tag} {status}  {msg}  [{secs:.1f}s of a {slice_s:.0f}s slice]", flush=True)
        summary['checks'].append(dict(rec, status=status, message=msg, seconds=round(secs, 1), slice_s=round(slice_s, 1),
                                      log=str(log), numbers=nums))
        if status == 'FAIL':
            tail = [l for l in text.splitlines() if l.strip()][-15:]
            for l in tail: print(f"      | {l[:300]}")
            print(f"gpu_acceptance: FAILED at {c['name']}: {msg} (full output: {log})", flush=True)
            return finish('FAIL', c['name'])
    n_pass = sum(ch['status'] == 'PASS' for ch in summary['checks'])
    n_skip = sum(ch['status'] == 'SKIP' for ch in summary['checks'])
    print(f"gpu_acceptance: PASS — {n_pass} passed, {n_skip} skipped, {time.monotonic() - t_start:.0f}s of the {a.budget_s:.0f}s budget; "
          f"summary: {out / 'gpu_acceptance.json'}", flush=True)
    return finish('PASS')


if __name__ == '__main__':
    sys.exit(main())
