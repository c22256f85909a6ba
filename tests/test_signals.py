"""The put-back of signal handlers that the stops of training, generation and the launchers share."""

import signal
import threading

from wavenet.signals import Handling


def test_handlers_are_put_back_after_and_left_alone_outside_the_main_thread():
    def handler(signum, frame):
        pass

    before = signal.getsignal(signal.SIGUSR1)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    try:
        with Handling(handler, signal.SIGUSR1, signal.SIGUSR2) as handling:
            assert signal.getsignal(signal.SIGUSR1) is handler and signal.getsignal(signal.SIGUSR2) is handler
            assert handling.previous == {signal.SIGUSR1: before, signal.SIGUSR2: signal.SIG_IGN}
        assert signal.getsignal(signal.SIGUSR1) == before and signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN

        in_thread = []

        def enter() -> None:
            with Handling(handler, signal.SIGUSR1) as handling:  # signal.signal would raise ValueError here
                in_thread.append((handling.previous, signal.getsignal(signal.SIGUSR1)))

        thread = threading.Thread(target=enter)
        thread.start()
        thread.join()
        assert in_thread == [({}, before)]
    finally:
        signal.signal(signal.SIGUSR1, before)
        signal.signal(signal.SIGUSR2, signal.SIG_DFL)
