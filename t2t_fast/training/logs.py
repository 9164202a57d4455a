"""What a run prints: rank-aware logging and a progress bar or periodic progress lines."""
import logging
import sys
import time

_logger = logging.getLogger(__name__)


def setup_logging(primary, log_file=None):
    """Bare INFO lines on stdout for the primary rank (warnings only elsewhere), plus an optional file."""
    handlers = [logging.StreamHandler(sys.stdout)]
    if primary and log_file:
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handlers.append(file_handler)
    logging.basicConfig(level=logging.INFO if primary else logging.WARNING, format="%(message)s",
                        handlers=handlers, force=True)


class Progress:
    """tqdm bar on an interactive terminal (primary rank), else a plain log line every ``interval`` steps."""

    def __init__(self, total, desc, primary, interval):
        self.total, self.desc, self.interval = total, desc, max(1, interval)
        self.bar = None
        self.start = time.perf_counter()
        self.enabled = primary
        if primary and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    def update(self, step, text):
        """``text`` is a callable (so metrics are only synced and formatted when shown)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            if step % self.interval == 0 or step == self.total:
                self.bar.set_postfix_str(text())
        elif step % self.interval == 0 or step == self.total:
            elapsed = time.perf_counter() - self.start
            _logger.info("%s [%d/%d (%.0f%%)] %s  %.3fs/step", self.desc, step, self.total,
                         100.0 * step / self.total, text(), elapsed / step)

    def close(self):
        if self.bar is not None:
            self.bar.close()
