"""moevl.train: training and evaluation of the kit's models.

``moevl.train.data`` writes the synthetic multi-task shapes data set (LLaVA conversation format),
``moevl.train.score`` scores answers, ``moevl.train.evaluate`` measures a session's quality per task and language.
"""
