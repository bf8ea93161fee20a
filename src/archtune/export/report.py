"""What one `archtune export` produced and how its checks went (`ExportReport.ok`, `to_json`)."""
from __future__ import annotations

from dataclasses import dataclass, field

from archtune.export.compare import Verification
from archtune.export.merge_check import MergeCount
from archtune.export.serving import ExpertLayout


@dataclass
class ExportReport:
    format: str
    path: str
    merged_tensors: MergeCount | None
    verifications: list[Verification] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    prompt_source: str = ""
    notes: list[str] = field(default_factory=list)
    # An adapter with 3D expert LoRA: its expert deltas as a serving engine's loader reads the files.
    serving_layout: ExpertLayout | None = None

    @property
    def ok(self) -> bool:
        merged_ok = self.merged_tensors is None or self.merged_tensors.ok
        layout_ok = self.serving_layout is None or self.serving_layout.ok
        return merged_ok and layout_ok and bool(self.verifications) and all(v.ok for v in self.verifications)

    def to_json(self) -> dict:
        main = self.verifications[0].to_json() if self.verifications else None
        return {"format": self.format, "path": self.path,
                "merged_tensors": self.merged_tensors.to_json() if self.merged_tensors else None,
                "verification": main, "quantized": [v.to_json() | {"path": f} for v, f in
                                                     zip(self.verifications[1:], self.files[1:])],
                "files": list(self.files), "prompt_source": self.prompt_source, "ok": self.ok,
                "serving_layout": self.serving_layout.to_json() if self.serving_layout else None,
                "notes": list(self.notes)}
