"""What the Blocks call: `Lab`, the app's state (ui/lab/state.py) composed with one part per panel or tab.

Each part's methods take the component values as plain Python values and return (or yield, for live updates)
plain values and Plotly figures, testable without a browser. Errors become gr.Error with what to do
(ui/errors.py). Where each button's work is done (ui/layout.py wires these):

  lab.picker        ui/lab/picker.py         model picker, Hub search, memory estimate
  lab.loader        ui/lab/loading.py        Load: the host's checks, the LoadSpec, loading and its status lines
  lab.page          ui/lab/startup.py        page load: the picker filled, the default engine, the panel's values
  lab.generate_tab  ui/lab/generate_tab.py   Generate on the engine or an endpoint
  lab.presets       ui/lab/preset.py         a preset's panel values, the panel's put back after its run
  lab.compare_tab   ui/lab/compare_tab.py    Compare A / B (or an endpoint)
  lab.benchmark_tab ui/lab/benchmark_tab.py  Benchmark (backend/tools/bench.py)
  lab.inside_tab    ui/lab/inside_tab.py     Inside the engine: trace, module tree, description, KV view
  lab.images        ui/lab/image_panel.py    the image inputs (what the model takes, the sample), Inside's image request
  lab.stop, lab.unload_visitor (ui/lab/state.py): the Stop buttons and a closed page

The host's policy (backend/hosting) is the Lab's: which model names a visitor may load, remote code (the
host's decision; the visitor's trust_remote_code is ignored), the memory check before any download, how many
visitors may load a model of their own, the caps on each run, and each visitor's parallel sequences. Every
engine request carries its browser session as `owner`, so the engine schedules fairly across visitors.
"""

from __future__ import annotations

from backend.hosting import HostPolicy
from ui.lab.benchmark_tab import BenchmarkTab
from ui.lab.compare_tab import CompareTab
from ui.lab.generate_tab import GenerateTab
from ui.lab.image_panel import ImagePanel
from ui.lab.inside_tab import InsideTab
from ui.lab.loading import Loader
from ui.lab.picker import ModelPicker
from ui.lab.preset import PresetButtons
from ui.lab.startup import PageStartup
from ui.lab.state import LabState
from ui.session import Session


class Lab(LabState):
    """The app's state (LabState: the engine session, the runs, the host's policy and model slots) and its parts,
    which all share it."""

    def __init__(
        self,
        session: Session | None = None,
        update_s: float = 0.3,
        policy: HostPolicy | None = None,
        host_model: str | None = None,
    ) -> None:
        super().__init__(session=session, update_s=update_s, policy=policy, host_model=host_model)
        self.picker = ModelPicker(self)
        self.loader = Loader(self)
        self.page = PageStartup(self, self.picker, self.loader)
        self.generate_tab = GenerateTab(self)
        self.presets = PresetButtons(self, self.loader)
        self.compare_tab = CompareTab(self, self.loader)
        self.benchmark_tab = BenchmarkTab(self, self.loader)
        self.inside_tab = InsideTab(self)
        self.images = ImagePanel(self)
