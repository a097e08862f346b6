"""What the command lines (sample.py, train.py, quickstart.py) share: a mistake is one line naming the flag, the
problem and the fix, found before any weight is loaded; help that shows the defaults that exist."""
import argparse

import torch


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the whole usage block first
        self.exit(2, f"{self.prog}: error: {message} (--help lists every flag)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each help text (except unset ones, whose help says what happens, and on/off flags,
    whose default is the other state), the description and examples verbatim."""
    def _get_help_string(self, action):
        unset = action.default is None or action.default is False or action.default == "" or action.nargs == 0
        return action.help if unset else super()._get_help_string(action)


def check_ranges(args, rules):
    """rules: (flag, ok, rule) rows, e.g. ("--steps", args.steps >= 1, ">= 1"); the first failing one is refused
    (a NaN fails every comparison, so it is refused too)."""
    for flag, ok, rule in rules:
        if not ok:
            raise ValueError(f"{flag} {getattr(args, flag[2:].replace('-', '_'))}: must be {rule}")


def parse_device(text):
    """--device -> torch.device, refused now when torch does not know it or this machine lacks it."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"--device {text}: not a device name; use cpu, cuda or cuda:N (mps on a Mac)") from None
    try:
        torch.empty(0, device=device)
    except Exception as e:  # no CUDA build, no GPU, index out of range
        raise ValueError(f"--device {text}: not available here ({str(e).splitlines()[0]}); use cpu") from None
    return device
