"""Resident memory of this process and every process it started (Ray's included), sampled
every 0.2 s on a thread while a `with` block runs: the peak of their sum (`peak`) and the peak
of the largest single one (`peak_one`, with its command line in `who`)."""

from __future__ import annotations

import threading
import time

import psutil


class PeakMemory:
    def __init__(self, interval_s: float = 0.2):
        self.peak = 0
        self.peak_one, self.who = 0, ""
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    rss = p.memory_info().rss
                    total += rss
                    if rss > self.peak_one:
                        self.peak_one, self.who = rss, " ".join(p.cmdline()[:3])[:80]
                except psutil.Error:  # gone, or a zombie, between the listing and the read
                    pass
            self.peak = max(self.peak, total)
            time.sleep(self.interval_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
