"""LayeredTransport: a transport over another one (TLS records, WebSocket frames), as the relay sees it.

What it writes it frames onto the transport below (each layer says how); reading, flow control and the
socket's own details stay the lower transport's, so the relay's backpressure works through any layer.
"""

from __future__ import annotations

import asyncio
from typing import Any


class LayeredTransport(asyncio.Transport):
    def __init__(self, raw: asyncio.Transport) -> None:
        super().__init__()
        self.raw = raw

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def abort(self) -> None:
        self.raw.abort()

    def is_closing(self) -> bool:
        return self.raw.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.raw.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self.raw.pause_reading()

    def resume_reading(self) -> None:
        self.raw.resume_reading()

    def is_reading(self) -> bool:
        return self.raw.is_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.raw.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self.raw.get_write_buffer_size()

    def can_write_eof(self) -> bool:
        return False
