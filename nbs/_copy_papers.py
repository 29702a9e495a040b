"Quarto post-render step (nbs/_quarto.yml): copy papers/*.html into the rendered site's papers/ folder."
import os, shutil
from pathlib import Path

out = Path(os.environ.get('QUARTO_PROJECT_OUTPUT_DIR', '_docs')) / 'papers'
src = next((p for p in (Path('../papers'), Path('../../papers')) if p.is_dir()), None)   # from nbs/ or nbdev's _proc/
if src is not None:
    out.mkdir(parents=True, exist_ok=True)
    for f in src.glob('*.html'): shutil.copy2(f, out / f.name)
