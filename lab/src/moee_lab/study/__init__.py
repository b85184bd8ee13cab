"""`moee study`: the paper's study on the embedded default — the ablation from random experts
to MoEE, p sweeps per method, the MAC-budget mode, and (in the full study) clustering
algorithms, selection and routing variants and calibration size; each point cached, so an
interrupted study resumes. The core library never imports this package."""

from moee_lab.study.points import StudyPoint, study_points
from moee_lab.study.runner import StudyConfig, run_study

__all__ = ["StudyConfig", "StudyPoint", "run_study", "study_points"]
