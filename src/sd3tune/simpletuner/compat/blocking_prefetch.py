"""Fix 3: with ``dataloader_prefetch`` (``data.prefetch``, on by default), SimpleTuner's ``BatchFetcher.next_response``
waits for the next batch with ``while self.queue.empty(): continue``: the training thread spins, taking the GIL from
the very thread that loads the batch (in a GPU profile, 10% of the training thread's samples: benchmarks/README.md).
Block on the queue instead (with a timeout, so Ctrl-C still gets through). The loader thread also ends silently on any
error loading a batch (it logs it at debug level only), and the wait then never ended (seen: a caption file of blank
lines, whose IndexError hung the run at 0% CPU): when that thread has stopped and the queue is empty, fail with a
message instead."""

from __future__ import annotations

import queue

from sd3tune.simpletuner.compat._patching import expect, replace

PREFETCH_STOPPED = ("sd3tune: SimpleTuner's batch prefetch thread stopped without a batch for step {step} (it "
                    "drops the error that stopped it); set --dataloader_prefetch=false in TRAINER_EXTRA_ARGS and train again "
                    "to see that error")


def applies_to(module) -> str | None:
    # the replacement re-does what the pinned next_response does after its busy wait: take the item, hand it to the
    # device prefetcher, record the step
    return (expect(module, "_set_epoch_step_for_training_step")
            or expect(module, "BatchFetcher.start_fetching", ("self",), source=("return thread",))
            or expect(module, "BatchFetcher.next_response", ("self", "step"),
                      source=("self.queue.get()", "self.device_prefetcher.consume(item)",
                              "_set_epoch_step_for_training_step(step)")))


def apply(module) -> None:
    set_step = module._set_epoch_step_for_training_step

    def remembering(start_fetching):
        def start(self):
            thread = start_fetching(self)
            self.__dict__["_sd3tune_thread"] = thread
            return thread
        return start

    def blocking(_busy_wait):
        def next_response(self, step: int):
            self.step = step
            while True:
                try:
                    item = self.queue.get(timeout=1.0)
                    break
                except queue.Empty:
                    thread = self.__dict__.get("_sd3tune_thread")
                    if thread is not None and not thread.is_alive() and self.queue.empty():
                        raise RuntimeError(PREFETCH_STOPPED.format(step=step)) from None
                    continue
            if self.device_prefetcher is not None:
                item = self.device_prefetcher.consume(item)
            set_step(step)
            return item
        return next_response

    replace(module.BatchFetcher, "start_fetching", remembering)
    replace(module.BatchFetcher, "next_response", blocking)
