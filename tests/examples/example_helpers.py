"""What the example tests share."""

import signal


def ctrl_c_after_step(trainer_class, step: int):
    """A subclass of ``trainer_class`` that presses Ctrl-C (SIGINT, as a terminal would) once step ``step``
    is done: for examples that build their trainer themselves, patched in where they look it up."""

    class CtrlCAfterStep(trainer_class):
        def train_step(self):
            result = super().train_step()
            if self.step == step:
                signal.raise_signal(signal.SIGINT)
            return result

    return CtrlCAfterStep
