"""Settings of every test session: one thread. On a shared machine two OpenMP threads wait on
each other whenever another process holds a core (a 0.3 ms forward pass then takes 90 ms), and
the suite's small problems gain nothing from a second thread."""

import torch

torch.set_num_threads(1)
