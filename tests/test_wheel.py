"""The wheel-install check (tools/check_wheel_install.sh) as a test.

It builds the wheel, installs it with torch into a fresh venv and uses the
model hub, inference by name and a packaged tool from outside the source
tree: about 2-3 minutes, mostly installing torch and the dependencies (which
needs PyPI or a mirror). Skip it with DAVIT_EXT_SKIP_WHEEL=1.
"""
import os
import os.path as osp
import shutil
import subprocess

import pytest

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))


@pytest.mark.skipif(
    os.environ.get('DAVIT_EXT_SKIP_WHEEL') == '1',
    reason='DAVIT_EXT_SKIP_WHEEL=1')
@pytest.mark.skipif(shutil.which('bash') is None, reason='needs bash')
def test_wheel_installs_and_serves_models_outside_the_tree():
    proc = subprocess.run(
        ['bash', osp.join(REPO, 'tools', 'check_wheel_install.sh')],
        capture_output=True,
        text=True,
        timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert 'wheel check: all good' in proc.stdout
