"""supra.pages.paper: the HTML paper opens offline in headless Chromium, renders its tables and figures, makes no
network request, and shows model text as text. Plus the figure helpers' files."""
import json, re
from pathlib import Path

import pytest
from markupsafe import Markup
from supra.pages.figures import bar_chart, curves_chart, line_chart, twin_axis_chart
from supra.pages.paper import chart, findings, links, prose, render_paper, row, samples, stats, table, write_paper
try: from tests.browser import Page, foreign_requests
except ImportError:  # pytest run without the project root on sys.path
    import sys; sys.path.insert(0, str(Path(__file__).parent)); from browser import Page, foreign_requests

XSS = ['<script>window.__pwned = 1</script>', '<img src="x" onerror="window.__pwned = 2">', '"><svg onload="window.__pwned=3">']


def _paper(d: Path) -> Path:
    "A paper with every section kind; hostile strings in every text field that could come from a model or data set."
    runs = ['Epoch 1', 'Epoch 2', '<b>Epoch 3</b>']
    acc, se = [0.54, 0.56, 0.58], [0.004, 0.004, 0.005]
    f1 = line_chart(runs, {'BLiMP': (acc, se)}, d / 'figs' / 'acc', baselines={'chance': 0.5}, ypct=True)
    f2 = twin_axis_chart(runs, {'loss': [6.5, 5.9, 5.4]}, {'BLiMP': acc}, d / 'figs' / 'twin')
    f3 = bar_chart(['a', 'b', 'c'], acc, se, d / 'figs' / 'bars', highlight=2)
    import numpy as np
    f4 = curves_chart({'run <x>': (np.arange(500), np.linspace(9, 3, 500))}, d / 'figs' / 'curves', smooth=0.5)
    (d / 'results.json').write_text(json.dumps({'acc': acc}))
    spec = dict(title='Test paper ' + XSS[0], kicker='Experiment #0', lede='Made-up numbers for a browser test.', banner='test',
                sections=[findings(['one', ('two', XSS[1])]),
                          table(runs, [row('BLiMP', acc, se, fmt='pct', best='max', chance=0.5), row('loss ' + XSS[2], [6.5, 5.9, 5.4], best='min')],
                                baselines=('chance',), status=['a', 'b', ('best', 'success')], title='Main', nav='Results'),
                          table(['x'], [row('n', [1], fmt='int')], title='Second'),
                          chart(f1, 'SVG chart', nav='Charts'), chart(f2.png, 'PNG chart'), chart(f3, 'Bars'), chart(f4.svg, 'Curves'),
                          samples([('Epoch 1', XSS[0]), dict(label=XSS[1], text='ok & fine', note=XSS[2])], prompt=XSS[0]),
                          prose('Method', [Markup('<em id="trusted">trusted</em>')], ['limitation ' + XSS[1]]),
                          links([dict(title='results', path=d / 'results.json'), dict(title='HF', href='https://huggingface.co/x')]),
                          stats({'Hardware': XSS[0], 'Seeds': '1'})])
    return write_paper(d / 'paper' / 'index.html', spec)


def test_paper_html_is_self_contained_and_escaped(tmp_path):
    html = _paper(tmp_path).read_text()
    assert '<script' not in html                     # no scripts at all: every <script> came from "model" text
    assert 'onerror="window' not in html and 'onload="window' not in html
    assert html.count('data:image/svg+xml;base64,') == 3 and html.count('data:image/png;base64,') == 1
    assert not re.search(r'(src|href)="(https?:)?//(?!huggingface)', html)  # only the plain outbound link
    assert '<link' not in html and '@import' not in html and '@font-face' not in html
    assert 'href="../results.json"' in html          # artefact links are relative to the paper
    assert '<em id="trusted">trusted</em>' in html   # trusted prose, only when asked for


def test_paper_renders_in_chromium_offline(tmp_path):
    path = _paper(tmp_path)
    with Page(width=1200) as page:
        page.goto(path.as_uri())
        tables = page.eval('[...document.querySelectorAll("table")].map(t => t.rows.length)')
        assert tables == [4, 2]                       # header + 2 rows + status row; header + 1 row
        assert page.eval('document.querySelectorAll("td.winner-badge").length') == 2
        imgs = page.eval('[...document.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight, i.getBoundingClientRect().width])')
        assert len(imgs) == 4 and all(c and w > 100 and h > 100 and bw > 100 for c, w, h, bw in imgs), imgs
        assert page.eval('typeof window.__pwned') == 'undefined'          # no injected script ran
        gen = page.eval('document.querySelector(".sample .gen").textContent')
        assert '<script>window.__pwned = 1</script>' in gen               # ... it is shown as text
        assert page.eval('document.getElementById("trusted") !== null')
        assert page.eval('getComputedStyle(document.body).backgroundColor') == 'rgb(15, 15, 15)'
        page.screenshot(tmp_path / 'paper.png')
    assert foreign_requests(page.requests) == [], page.requests
    assert any(u.startswith('file://') for u in page.requests)


def test_network_recorder_sees_requests(tmp_path):
    "Negative control: the no-network assertion above can fail — a remote image is recorded."
    p = tmp_path / 'bad.html'
    p.write_text('<html><body><img src="http://127.0.0.1:9/logo.png"><script src="https://cdn.jsdelivr.net/npm/chart.js"></script></body></html>')
    with Page() as page:
        page.goto(p.as_uri(), timeout=20)
        page.pump(0.5)
    bad = foreign_requests(page.requests)
    assert 'http://127.0.0.1:9/logo.png' in bad and any('cdn.jsdelivr.net' in u for u in bad)


def test_figures_saved_atomically_and_deterministically(tmp_path):
    f = line_chart([1, 2, 3], {'a': [1, 2, 3], 'b': ([3, 2, 1], [0.1, 0.1, 0.1])}, tmp_path / 'f.png')
    assert f.svg.suffix == '.svg' and f.png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    g = line_chart([1, 2, 3], {'a': [1, 2, 3], 'b': ([3, 2, 1], [0.1, 0.1, 0.1])}, tmp_path / 'g')
    assert f.svg.read_bytes() == g.svg.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ['f.png', 'f.svg', 'g.png', 'g.svg']   # no temp files left


def test_missing_figure_is_a_clear_error(tmp_path):
    spec = dict(title='t', sections=[chart(tmp_path / 'nope.svg', 'x')])
    with pytest.raises(FileNotFoundError, match='nope.svg'):
        render_paper(spec)
    assert not (tmp_path / 'p.html').exists()


def _matrix_paper(d: Path) -> Path:
    "The epoch matrix's shape: 8 epoch columns, two baselines, ± stderr on every cell, a status row; one constant row."
    cols = [f'Epoch {k}' for k in range(1, 9)]
    rows = [row('Final train loss (↓)', [6.6 - 0.3 * i for i in range(8)], [0.01] * 8, best='min'),
            row('Held-out bits/byte (↓)', [2.8 - 0.07 * i for i in range(8)], [0.004] * 8, best='min'),
            row('BLiMP (↑)', [0.49 + 0.001 * i for i in range(8)], [0.0073] * 8, fmt='pct', best='max', chance=0.5, majority=0.5),
            row('ARC-Easy (↑)', [0.16, 0.2, 0.22, 0.18, 0.2, 0.34, 0.22, 0.2], [0.055] * 8, fmt='pct', best='max', chance=0.25, majority=0.32),
            row('BoolQ (↑)', [0.22] * 8, [0.059] * 8, fmt='pct', best='max', chance=0.5),
            row('WikiText PPL (↓)', [900 - 10 * i for i in range(8)], best='min', informative=False, note='one seed: within noise')]
    t = table(cols, rows, title='The 8-epoch matrix', baselines=('chance', 'majority'), highlight_col=7,
              status=[('under-trained (1 seed)', None)] * 7 + [('best held-out (1 seed)', 'success')])
    return write_paper(d / 'matrix.html', dict(title='Matrix', sections=[t]))


def test_wide_table_fits_the_seed_width_and_badges_only_real_winners(tmp_path):
    path = _matrix_paper(tmp_path)
    html = path.read_text()
    assert html.count('class="winner-badge"') == 3        # train loss, bits/byte, ARC-Easy (34% > majority 32%)
    assert html.count('class="uninformative"') == 2       # BLiMP (never above its majority baseline), WikiText (flagged)
    with Page(width=1000, height=900) as page:             # the seed pages' width
        page.goto(path.as_uri())
        sizes = page.eval('[...document.querySelectorAll(".table-container")].map(c => [c.scrollWidth, c.clientWidth])')
        assert sizes and all(s <= c for s, c in sizes), sizes   # no horizontal scrolling
        badges = page.eval('[...document.querySelectorAll("td.winner-badge")].map(td => td.closest("tr").cells[0].textContent)')
        assert [b.split(' (')[0] for b in badges] == ['Final train loss', 'Held-out bits/byte', 'ARC-Easy']
        muted = page.eval('getComputedStyle(document.querySelector("tr.uninformative td")).color')
        assert muted == 'rgb(136, 136, 136)'


def test_index_renders_in_chromium_offline(tmp_path):
    "The index from a results envelope: its title (the question of a write-up without a QUESTION) and its scale line, hostile strings included, as text."
    from supra.pages.index import write_index
    from supra.lab.experiment import envelope
    from supra.lab.stats import group_summary
    papers, outputs = tmp_path / 'papers', tmp_path / 'outputs'
    _matrix_paper(papers)
    runs = [dict(arm='a', seed=0, heldout_bpb=2.0)]
    res = envelope(experiment='matrix', title='How small? ' + XSS[0], plan={}, preset='cpu', corpus='wikipedia-en', environment=dict(hardware=XSS[1]),
                   data={}, runs=runs, summary=dict(by_arm=group_summary(runs, 'arm', ['heldout_bpb'])), curves={}, compute={}, status={})
    (outputs / 'matrix').mkdir(parents=True)
    (outputs / 'matrix' / 'results.json').write_text(json.dumps(res))
    idx = write_index(papers, outputs)
    with Page(width=1000) as page:
        page.goto(idx.as_uri())
        cards = page.eval('[...document.querySelectorAll("article.paper-card")].map(a => [a.querySelector("h3").textContent, a.querySelector(".scale").textContent, a.querySelector(".headline").textContent])')
        assert cards == [['How small? ' + XSS[0], 'cpu preset · corpus wikipedia-en · 1 seed · ' + XSS[1], 'See the write-up for its findings.']]
        assert page.eval('typeof window.__pwned') == 'undefined'
        hrefs = page.eval('[...document.querySelectorAll("article a")].map(a => a.getAttribute("href"))')
        assert hrefs == ['matrix.html', 'matrix.html', '../outputs/matrix/results.json']
        page.goto((papers / 'matrix.html').as_uri())
        assert page.eval('document.querySelector(".logo-area a").getAttribute("href")') == 'index.html'
    assert foreign_requests(page.requests) == [], page.requests


def test_many_runs_transpose_and_fit(tmp_path):
    "A sweep-sized table (12 runs) is turned: runs as rows, metrics as columns; it fits 1000 px and keeps its badges."
    runs = [f'config <{i}>' for i in range(12)]
    t = table(runs, [row('Held-out bpb (↓)', [2.0 - 0.01 * i for i in range(12)], [0.01] * 12, best='min'),
                     row('BLiMP (↑)', [0.5 + 0.004 * i for i in range(12)], [0.005] * 12, fmt='pct', best='max', chance=0.5),
                     row('BoolQ (↑)', [0.22] * 12, fmt='pct', best='max', chance=0.5, majority=0.62)],
              baselines=('chance', 'majority'), status=[('ok', None)] * 11 + [('best', 'success')], highlight_col=11)
    path = write_paper(tmp_path / 'sweep.html', dict(title='Sweep', sections=[t]))
    with Page(width=1000, height=900) as page:
        page.goto(path.as_uri())
        sizes = page.eval('[...document.querySelectorAll(".table-container")].map(c => [c.scrollWidth, c.clientWidth])')
        assert sizes and all(s <= c for s, c in sizes), sizes
        heads = page.eval('[...document.querySelectorAll("thead th")].map(th => th.firstChild.textContent)')
        assert heads == ['Run', 'Held-out bpb (↓)', 'BLiMP (↑)', 'BoolQ (↑)', 'Status']
        rows = page.eval('[...document.querySelectorAll("tbody tr")].map(tr => tr.cells[0].textContent)')
        assert rows == runs + ['chance', 'majority']
        best = page.eval('[...document.querySelectorAll("td.winner-badge")].map(td => td.closest("tr").cells[0].textContent)')
        assert best == ['config <11>', 'config <11>']
