"""Run finetune/train.py, SIGKILLed while it writes the checkpoint of step N (a test helper).

    python tests/scripts/kill_at_checkpoint.py N [train.py flags ...]

The kill comes after the checkpoint's weights and optimizer state are written and before its
trainer state (`Trainer._save_rng_state` runs between the two), the way a power cut or the OOM
killer would leave it. Test-only: this wrapper, not the library, is patched.
"""

import os
import runpy
import signal
import sys
from pathlib import Path

import transformers

kill_step = int(sys.argv.pop(1))
save_rng_state = transformers.Trainer._save_rng_state


def save_rng_state_or_die(self, output_dir):
    if self.state.global_step == kill_step:
        os.kill(os.getpid(), signal.SIGKILL)
    return save_rng_state(self, output_dir)


transformers.Trainer._save_rng_state = save_rng_state_or_die
script = Path(__file__).resolve().parents[2] / "finetune" / "train.py"
sys.argv = [str(script), *sys.argv[1:]]
runpy.run_path(str(script), run_name="__main__")
