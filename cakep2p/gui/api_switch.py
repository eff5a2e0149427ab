"""The window's "Serve OpenAI API" switch: an ApiSwitch runs `cakep2p.api` for the loaded model on its own thread,
and an ApiPanel shows the switch, the port and the URL to copy.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

from PySide6.QtCore import QObject, Signal
from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import QCheckBox, QHBoxLayout, QLabel, QLineEdit, QPushButton, QSpinBox, QVBoxLayout, QWidget

from cakep2p.errors import CakeError

log = logging.getLogger(__name__)

HOST = "127.0.0.1"   # the window never exposes the API beyond this machine (that needs `cakep2p api --api-key`)
DEFAULT_PORT = 8000


class ApiSwitch(QObject):
    """At most one API server, for the current model; every public method returns at once.

    Starting and stopping run on one worker thread in the order asked (stopping waits up to 5 s for open
    requests), so the UI thread never waits on uvicorn. The server runs while the switch is on and a model
    is set; a new model restarts it, no model stops it until one comes.
    """

    serverStarted = Signal(str)   # the base URL clients use, ending in /v1
    serverStopped = Signal()
    serverFailed = Signal(str)    # the switch went off: why (port busy, ...)

    def __init__(self, parent: QObject | None = None):
        super().__init__(parent)
        self._jobs = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cakep2p-gui-api")
        self._server: Any = None          # cakep2p.api.BackgroundServer, touched on the worker thread only
        self._served_model: Any = None
        self._model: Any = None
        self._port = DEFAULT_PORT
        self._enabled = False
        self._closed = False

    @property
    def enabled(self) -> bool:
        return self._enabled

    def set_enabled(self, enabled: bool, port: int = DEFAULT_PORT) -> Future | None:
        """Turn the server on (on `port`) or off."""
        return self._submit(lambda: self._set_enabled(enabled, port))

    def set_model(self, model: Any) -> Future | None:
        """The model to serve (None while none is loaded, or while another one loads)."""
        return self._submit(lambda: self._set_model(model))

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the server and the worker (blocks until both are done; called when the window closes)."""
        if self._closed:
            return
        self._closed = True
        stopped = self._jobs.submit(self._stop)
        self._jobs.shutdown(wait=True, cancel_futures=True)
        if not stopped.cancelled() and stopped.exception(timeout) is not None:
            log.warning("stopping the API server failed: %s", stopped.exception())

    def _submit(self, job: Callable[[], None]) -> Future | None:
        return None if self._closed else self._jobs.submit(self._guard(job))

    # On the worker thread ----------------------------------------------------------------------------
    def _set_enabled(self, enabled: bool, port: int) -> None:
        self._enabled, self._port = enabled, port
        self._apply()

    def _set_model(self, model: Any) -> None:
        self._model = model
        self._apply()

    def _apply(self) -> None:
        """Bring the server in line with the switch, the port and the model."""
        wanted = self._enabled and self._model is not None
        server = self._server
        if server is not None and (not wanted or self._served_model is not self._model or server.port != self._port):
            self._stop()
        if wanted and self._server is None:
            self._start()

    def _start(self) -> None:
        from cakep2p.api import BackgroundServer, create_app

        model = self._model
        server = BackgroundServer(create_app(model), HOST, self._port)
        try:
            url = server.start()
        except CakeError as error:
            self._enabled = False
            reason = str(error).split(";")[0]   # drop the command-line advice (--port, --host)
            raise CakeError(f"The API server is off: {reason}. Choose another port and switch it on again.") from None
        self._server, self._served_model = server, model
        self.serverStarted.emit(url + "/v1")

    def _stop(self) -> None:
        server, self._server, self._served_model = self._server, None, None
        if server is not None:
            server.stop()
            self.serverStopped.emit()

    def _guard(self, job: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                job()
            except CakeError as error:
                self.serverFailed.emit(str(error))
            except Exception as error:  # the window shows it; it never takes the app down
                log.exception("the API switch failed")
                self._enabled = False
                self.serverFailed.emit(f"The API server failed: {type(error).__name__}: {error}")
        return run


class ApiPanel(QWidget):
    """The switch, its port, and the URL to copy; it forwards intents and shows what the ApiSwitch reports."""

    switchToggled = Signal(bool, int)   # on, port

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.switch = QCheckBox(f"Serve OpenAI API on {HOST}:")
        self.switch.setToolTip("Lets OpenAI clients on this machine (Open WebUI, editor plugins, scripts) use the "
                               "loaded model.\nTo serve other machines, run `cakep2p api --host ... --api-key ...`.")
        self.port_box = QSpinBox()
        self.port_box.setRange(1, 65535)
        self.port_box.setValue(DEFAULT_PORT)
        self.url_edit = QLineEdit()
        self.url_edit.setReadOnly(True)
        self.copy_button = QPushButton("Copy")
        self.copy_button.setToolTip("Copy the base URL for an OpenAI client")
        self.hint = QLabel()
        self.hint.setWordWrap(True)
        self.hint.setStyleSheet("color: #4b5563;")
        self.switch.toggled.connect(self._on_toggled)
        self.copy_button.clicked.connect(self.copy_url)

        switch_row = QHBoxLayout()
        switch_row.addWidget(self.switch)
        switch_row.addWidget(self.port_box)
        switch_row.addStretch(1)
        url_row = QHBoxLayout()
        url_row.addWidget(self.url_edit, 1)
        url_row.addWidget(self.copy_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(switch_row)
        layout.addLayout(url_row)
        layout.addWidget(self.hint)
        self.show_stopped()
        self.set_model_ready(False)

    def port(self) -> int:
        return self.port_box.value()

    def url(self) -> str:
        return self.url_edit.text()

    def copy_url(self) -> None:
        if self.url():
            QGuiApplication.clipboard().setText(self.url())

    def set_model_ready(self, ready: bool, loading: bool = False) -> None:
        """No model: the switch is off-limits with a hint; a model loading keeps an on switch on."""
        self.switch.setEnabled(ready or (loading and self.switch.isChecked()))
        if ready:
            self.hint.setText("" if self.switch.isChecked() else "Off.")
        elif loading and self.switch.isChecked():
            self.hint.setText("Restarting when the model has loaded…")
        else:
            self.hint.setText("Load a model to serve it over the API.")

    def show_serving(self, url: str) -> None:
        self.url_edit.setText(url)
        self.url_edit.setEnabled(True)
        self.copy_button.setEnabled(True)
        self.port_box.setEnabled(False)
        self.hint.setText("Serving: point an OpenAI client at this URL (any API key).")

    def show_stopped(self, message: str = "") -> None:
        """The server is off (or waits for a model); with `message`, the switch went off because of it."""
        if message:
            self._set_checked(False)
        self.url_edit.clear()
        self.url_edit.setPlaceholderText("not serving")
        self.url_edit.setEnabled(False)
        self.copy_button.setEnabled(False)
        self.port_box.setEnabled(not self.switch.isChecked())
        self.hint.setText(message or ("Starting…" if self.switch.isChecked() else "Off."))

    def _on_toggled(self, on: bool) -> None:
        self.port_box.setEnabled(not on)
        self.hint.setText("Starting…" if on else "Stopping…")
        self.switchToggled.emit(on, self.port())

    def _set_checked(self, on: bool) -> None:
        self.switch.blockSignals(True)
        self.switch.setChecked(on)
        self.switch.blockSignals(False)
