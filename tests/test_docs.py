"""The documentation site: built from nbs/ with one library notebook executed (the full build executes every library
notebook, which repeats nbdev-test's work; one is enough to prove the pipeline), the papers copied in, and opened in
headless Chromium: the home page links the papers' index and every paper, and a lesson page shows its cells' outputs.

`python -m supra.docs` (nbclient + nbconvert) is the builder tested here because Quarto cannot be installed from a
package registry (PyPI's quarto-cli downloads its binary from GitHub at install time); nbs/_quarto.yml holds the
settings for `nbdev-docs` where Quarto is installed."""
import json, os, re, shutil, subprocess, sys
from pathlib import Path

import pytest

from tests.browser import Page, foreign_requests

ROOT = Path(__file__).resolve().parents[1]
LESSON = '03_train/04_trackers'         # quick to execute; its lesson prints TensorBoard's read-back of a run's rows
PAGE = LESSON.replace('/', '-') + '.html'   # the site is one flat folder: nbs/03_train/04_trackers.ipynb -> 03_train-04_trackers.html


@pytest.fixture(scope='module')
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp('docs') / 'site'
    env = dict(os.environ, OMP_NUM_THREADS='1')
    if not env.get('SUPRA_DATA') and (ROOT.parent / 'shared' / 'data').is_dir(): env['SUPRA_DATA'] = str(ROOT.parent / 'shared' / 'data')
    r = subprocess.run([sys.executable, '-m', 'supra.docs', '--out', str(out), '--only', LESSON], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return out


def test_site_files(site):
    rec = json.loads((site / 'site.json').read_text())
    assert rec['executed'] == [f'{LESSON}.ipynb']
    assert {'index.html', PAGE} <= set(rec['pages'])
    papers = sorted(p.name for p in (ROOT / 'papers').glob('*.html'))
    assert papers and sorted(rec['papers']) == papers
    for p in papers: assert (site / 'papers' / p).read_bytes() == (ROOT / 'papers' / p).read_bytes()
    page = (site / PAGE).read_text()
    assert '#| export' not in page and 'default_exp' not in page       # directives are not shown
    assert not re.search(r'<script[^>]*src="https?:', page)             # no script from the network


def test_home_and_lesson_in_chromium(site):
    with Page() as page:
        page.goto((site / 'index.html').as_uri())
        links = page.eval('[...document.querySelectorAll("a")].map(a => a.getAttribute("href"))')
        assert 'papers/index.html' in links, links
        for p in (ROOT / 'papers').glob('*.html'): assert f'papers/{p.name}' in links
        assert PAGE in links
        for h in links:                                                 # every local link of the home page resolves
            if h and not h.startswith(('http:', 'https:', '#', 'mailto:')): assert (site / h.split('#')[0]).exists(), h
        assert 'Supra' in page.eval('document.querySelector("h1").innerText')

        page.goto((site / 'papers' / 'index.html').as_uri())
        assert page.eval('document.querySelectorAll("a[href]").length') > 0

        page.goto((site / PAGE).as_uri())
        outs = page.eval('''[...document.querySelectorAll(".jp-OutputArea-output")]
                            .filter(e => e.getBoundingClientRect().height > 0).map(e => e.innerText)''')
        text = '\n'.join(outs)
        assert len(outs) >= 3, outs                                      # several cells show visible outputs
        assert "'loss'" in text and 'loss [(10,' in text, text[:2000]    # TensorBoard's read-back of the run's rows
        assert "pip install 'supra[trackio]'" in text                    # the missing-package message, as printed
        assert page.eval('document.querySelector(".supra-nav a.current").getAttribute("href")') == PAGE
        assert foreign_requests(page.requests) == [], foreign_requests(page.requests)

