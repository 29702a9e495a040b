"""The verdict engine (supra.lab.verdict) is the one place a p-value is computed: no other module of the package calls scipy's
tests or writes one by hand; its two-stage seed allocation keeps the family-wise false-positive rate at α and reaches the power it
predicts, on 10,000 simulated experiments each; and its verdicts follow the rules the papers state."""
import math, re, time
from pathlib import Path
import numpy as np
import pytest
from supra.lab.verdict import Metric, Comparison, Claim, Versus, judge, simulate, holm, versus

ROOT = Path(__file__).resolve().parents[1]
ENGINE = {'supra/lab/verdict.py', 'supra/lab/stats.py'}       # the tests (verdict) and the seed summaries they build on (stats)
PVALUE = re.compile(r'scipy|ttest_|pvalue|\.sf\(|norm\.cdf|erfc\(|\bp_value\b')

def test_no_p_value_outside_the_engine():
    bad = [f'{p.relative_to(ROOT)}:{i}: {l.strip()[:120]}' for p in sorted((ROOT / 'supra').rglob('*.py')) if p.name != '_modidx.py'
           and p.relative_to(ROOT).as_posix() not in ENGINE for i, l in enumerate(p.read_text().splitlines(), 1) if PVALUE.search(l)]
    assert not bad, bad

def test_the_grep_catches_a_hand_written_test():
    assert PVALUE.search("p = float(stats.ttest_1samp(xs, ng[k]).pvalue)") and PVALUE.search("p = 2 * norm.sf(abs(z))")

def test_two_stage_seeds_keep_alpha_and_reach_the_predicted_power():
    t0 = time.perf_counter()
    null = simulate(10_000, n1=3, n_max=12, effect=0.0, target=2.0, family=3, seed=1)
    assert null['fwer'] <= 0.01 + 3 * null['mc_se'], null            # no effect anywhere in a family of three: FWER ≤ α
    alt = simulate(10_000, n1=3, n_max=12, effect=2.0, target=2.0, family=3, seed=2)
    assert abs(alt['power'] - alt['predicted']) < 0.05, alt           # a planted effect: the power the plan predicted
    assert alt['seeds'] > 3 + 2                                       # seeds were added after the pilot
    print(null, alt, f'{time.perf_counter() - t0:.1f}s')

def test_a_naive_look_at_the_data_would_inflate_the_error():
    "The reason for the combination test: choosing n2 from the pilot and t-testing all seeds together is not held to α by construction."
    rng = np.random.default_rng(0); from scipy import stats as st   # the test may compute what the engine refuses to
    hits = 0
    for _ in range(4000):
        d1 = rng.normal(0, 1, 3); n2 = 2 if abs(d1.mean()) / d1.std(ddof=1) > 1 else 9      # peek at the effect, then decide
        hits += st.ttest_1samp(np.r_[d1, rng.normal(0, 1, n2)], 0).pvalue < 0.01
    assert hits / 4000 > 0.01

def rows_of(values:dict, metric='m', **extra):
    return [dict(arm=a, seed=s, **{metric: v}, **extra) for a, vs in values.items() for s, v in enumerate(vs)]

def test_the_design_picks_the_test_and_the_family_adjusts_p():
    rows = rows_of({'a': [2.24, 2.11, 2.10, 2.30, 2.2], 'b': [2.18, 2.075, 2.07, 2.25, 2.14]})
    m = Metric('m', 'bits/byte')
    paired, welch = judge(rows, [Comparison(m, 'a', 'b')]), judge(rows, [Comparison(m, 'a', 'b', paired=False)])
    assert paired[0]['test'].startswith('paired') and welch[0]['test'] == 'Welch t' and paired[0]['p'] < welch[0]['p']
    fam = judge(rows, [Comparison(m, 'a', 'b')] * 4)
    assert all(r['family_size'] == 4 and math.isclose(r['p_adj'], min(1, 4 * r['p'])) for r in fam)
    assert fam[0]['mde'] > paired[0]['mde'] and fam[0]['unit'] == 'bits/byte'     # the MDE at α/m, in the metric's unit

def test_claim_verdicts():
    m = Metric('m', 'points', lower_is_better=False, scale=100)
    rows = rows_of({'a': [0.60, 0.61, 0.59, 0.605], 'b': [0.50, 0.505, 0.495, 0.50]})
    r = judge(rows, [Claim('+10 points', m, 'a', 'b', value=0.10), Claim('+2 points', m, 'a', 'b', value=0.02),
                     Claim('+30 points', m, 'a', 'b', value=0.30), Claim('−5 points', m, 'a', 'b', value=-0.05),
                     Claim('x1.6', m, 'a', 'b', value=1.6, ratio=True, untestable='needs a vocabulary where SuperBPE compresses x1.6')])
    assert [x['verdict'] for x in r] == ['supported', 'supported', 'contradicted', 'contradicted', 'not testable here']
    assert 'lies beyond' in r[1]['reason'] and 'smaller than claimed' in r[2]['reason'] and r[4]['reason'].startswith('needs')
    assert r[0]['unit'] == 'points' and 9 < r[0]['effect'] < 11                      # shown in points, not as a fraction
    noisy = rows_of({'a': [0.60, 0.45, 0.70, 0.52], 'b': [0.50, 0.55, 0.48, 0.57]})
    assert judge(noisy, [Claim('+10 points', m, 'a', 'b', value=0.10)])[0]['verdict'] == 'bounded'   # neither: never "contradicted"

def test_shared_items_keep_their_error():
    rows = [dict(arm='x', seed=s, blimp=v, blimp_stderr=0.0049) for s, v in enumerate([0.5320, 0.5335, 0.5314])]
    v = versus(rows, 'blimp', 'x', 0.5)
    assert v['se'] >= 0.0049 and v['effect'] / v['se'] < 7                          # not z = 11.4 (stderr / sqrt(3))
    assert versus(rows, 'blimp', 'x', 0.5, select=8)['p'] == pytest.approx(min(1, 8 * v['p']))
    r = judge(rows, [Versus(Metric('blimp', 'points', False, 100), 'x', 0.5, 'chance', select=8)])[0]
    assert r['verdict'] == 'resolved' and r['direction'] == 'x better than chance' and r['reference'] == 50

def test_holm():
    assert holm([0.01, 0.04, 0.03, None]) == [0.03, 0.06, 0.06, None]
