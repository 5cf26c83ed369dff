from __future__ import annotations

import sys
from pathlib import Path

# tests/strategies.py is shared by every suite; pytest's default import mode
# puts only this directory on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
