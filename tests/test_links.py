"""Every link on every page in papers/ resolves for a reader of the repository: an in-page anchor that exists, an https
link, or a relative path to a file that is committed (not a git-ignored run artefact that only the machine that ran the
experiment has). Pages embed everything else (no src= other than data: URIs). Plus the renderer side: supra.pages.paper.links
names an ignored artefact with a note instead of linking it."""
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from supra.pages.paper import LOCAL_NOTE, findings, links, write_paper

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / 'papers').glob('*.html'))


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__(); self.hrefs, self.srcs, self.ids = [], [], set()
    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if 'id' in a: self.ids.add(a['id'])
        if tag == 'a' and 'href' in a: self.hrefs.append(a['href'])
        if 'src' in a: self.srcs.append(a['src'])


def _tracked(path: Path) -> bool | None:
    "Is `path` in git's index (committed or staged)? None when git or a repository is not available."
    try: r = subprocess.run(['git', 'ls-files', '--error-unmatch', '--', str(path)], cwd=path.parent if path.parent.exists() else ROOT,
                            capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired): return None
    return r.returncode == 0 if b'not a git repository' not in r.stderr else None


def _ignored(path: Path) -> bool:
    try: r = subprocess.run(['git', 'check-ignore', '-q', '--', str(path)], cwd=path if path.is_dir() else path.parent,
                            capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired): return False
    return r.returncode == 0


def dead_links(page: Path) -> list[str]:
    "The links of `page` that a reader of the repository could not follow, each with the reason."
    p = _Refs(); p.feed(page.read_text(errors='replace'))
    bad, page_tracked = [], _tracked(page)
    for h in p.hrefs:
        u = urlsplit(h)
        if u.scheme in ('https', 'mailto'): continue
        if u.scheme: bad.append(f'{h}: scheme {u.scheme!r} (only https links leave the page)'); continue
        if not u.path:
            if u.fragment not in p.ids: bad.append(f'{h}: no element with id {u.fragment!r} on the page')
            continue
        target = (page.parent / unquote(u.path)).resolve()
        if not target.exists(): bad.append(f'{h}: {target} does not exist')
        elif _ignored(target): bad.append(f'{h}: {target} is git-ignored (a local run artefact)')
        elif page_tracked and _tracked(target) is False: bad.append(f'{h}: {target} is not committed')
    bad += [f'src={s[:40]}: not embedded' for s in p.srcs if not s.startswith('data:')]
    return bad


def test_papers_exist():
    assert PAGES and (ROOT / 'papers' / 'index.html') in PAGES


@pytest.mark.parametrize('page', PAGES, ids=[p.name for p in PAGES])
def test_every_link_resolves(page):
    assert dead_links(page) == []


def test_index_lists_every_paper():
    p = _Refs(); p.feed((ROOT / 'papers' / 'index.html').read_text())
    for page in PAGES:
        if page.name != 'index.html': assert page.name in p.hrefs, page.name


def test_checker_catches_dead_links(tmp_path):
    "Negative control: the checker above can fail."
    (tmp_path / 'ok.txt').write_text('x')
    page = tmp_path / 'p.html'
    page.write_text('<p id="a"></p><a href="#a">ok</a><a href="ok.txt">ok</a><a href="https://x.org">ok</a>'
                    '<a href="#nope">x</a><a href="missing/final">x</a><a href="http://x.org">x</a><img src="logo.png">')
    bad = dead_links(page)
    assert len(bad) == 4 and any('#nope' in b for b in bad) and any('missing/final' in b for b in bad)


def test_renderer_names_ignored_artefacts_instead_of_linking(tmp_path):
    "In a repository that ignores run artefacts, a paper links its committed results.json and names the checkpoint."
    subprocess.run(['git', 'init', '-q', str(tmp_path)], check=True)
    (tmp_path / '.gitignore').write_text('outputs/*\n!outputs/*/\noutputs/*/*\n!outputs/*/results.json\n')
    out = tmp_path / 'outputs' / 'exp'; (out / 'runs' / 'final').mkdir(parents=True)
    (out / 'results.json').write_text('{}'); (out / 'runs' / 'final' / 'model.safetensors').write_bytes(b'0')
    page = write_paper(tmp_path / 'papers' / 'exp.html', dict(title='t', sections=[findings(['x']), links([
        dict(title='results.json', path=out / 'results.json'), dict(title='Checkpoint', path=out / 'runs' / 'final'),
        dict(title='Dashboard', path=out / 'runs' / 'dashboard.html'), dict(title='Elsewhere', href='../outputs/exp/runs/final')])]))
    html = page.read_text()
    assert 'href="../outputs/exp/results.json"' in html
    assert 'href="../outputs/exp/runs/final"' not in html and html.count(LOCAL_NOTE) == 3
    assert '../outputs/exp/runs/final' in html                 # still named, as text
    assert 'href="index.html"' in html                         # a paper in papers/ links home to the index
    assert [b for b in dead_links(page) if 'index.html' not in b] == []
