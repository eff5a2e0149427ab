"""The chat settings drawer: system prompt, sampling (temperature, top-p, max tokens) and raw-completion mode."""

from __future__ import annotations

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (QCheckBox, QDoubleSpinBox, QFormLayout, QLabel, QPlainTextEdit, QSpinBox,
                               QVBoxLayout, QWidget)

from cakep2p.engine.conversation import default_max_new_tokens
from cakep2p.engine.generation_config import GenerationDefaults
from cakep2p.engine.sampling import SamplingParams, sampling_params


class SettingsDrawer(QWidget):
    completionModeChanged = Signal(bool)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.system_prompt_edit = QPlainTextEdit()
        self.system_prompt_edit.setPlaceholderText("e.g. You are a concise assistant.")
        self.system_prompt_edit.setFixedHeight(90)
        self.temperature = QDoubleSpinBox()
        self.temperature.setRange(0.0, 2.0)
        self.temperature.setSingleStep(0.1)
        self.temperature.setValue(0.0)
        self.temperature.setToolTip("0 = greedy: always the most likely token (reproducible)")
        self.top_p = QDoubleSpinBox()
        self.top_p.setRange(0.01, 1.0)
        self.top_p.setSingleStep(0.05)
        self.top_p.setValue(1.0)
        self.max_tokens = QSpinBox()
        self.max_tokens.setRange(1, 32768)
        self.max_tokens.setValue(512)
        self.completion_mode = QCheckBox("Raw completion (no chat template)")
        self.completion_mode.setToolTip("The chat is one text the model continues as written, without chat roles\n"
                                        "(for base models, and for seeing the model as it is). Off: a chat, with the\n"
                                        "model's template, or a plain User/Assistant one when it has none.")
        self.completion_mode.toggled.connect(self.completionModeChanged)

        title = QLabel("Chat settings")
        title.setStyleSheet("font-weight: 700;")
        form = QFormLayout()
        form.addRow("Temperature", self.temperature)
        form.addRow("Top-p", self.top_p)
        form.addRow("Max tokens", self.max_tokens)
        layout = QVBoxLayout(self)
        layout.addWidget(title)
        layout.addWidget(QLabel("System prompt"))
        layout.addWidget(self.system_prompt_edit)
        layout.addLayout(form)
        layout.addWidget(self.completion_mode)
        layout.addStretch(1)
        self.setFixedWidth(260)

        self.defaults = GenerationDefaults()

    def set_model_defaults(self, defaults: GenerationDefaults | None, context: int) -> None:
        """Show the loaded model's recommended sampling (its generation_config.json; greedy when it has none) and an
        answer length that leaves the chat room for more turns."""
        self.defaults = defaults or GenerationDefaults()
        self.temperature.setValue(self.defaults.temperature)
        self.top_p.setValue(self.defaults.top_p)
        self.max_tokens.setValue(default_max_new_tokens(context))

    def params(self) -> SamplingParams:
        """The drawer's values on top of the model's defaults (top-k and repetition penalty come from the model)."""
        return sampling_params(self.defaults, max_new_tokens=self.max_tokens.value(),
                               temperature=self.temperature.value(), top_p=self.top_p.value())

    def system_prompt(self) -> str | None:
        return self.system_prompt_edit.toPlainText().strip() or None

    def set_completion_mode(self, enabled: bool) -> None:
        """Reflect the model's mode without asking for a new chat."""
        self.completion_mode.blockSignals(True)
        self.completion_mode.setChecked(enabled)
        self.completion_mode.blockSignals(False)
