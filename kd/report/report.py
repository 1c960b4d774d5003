"""The reports' former single module: its jobs now live in the modules of kd.report (see the
package's docstring). kd/run/runner.py, kd/run/tuning.py, kd/run/outdir.py and bench/*.py still
import these names from here."""
from kd.report.provenance import cpu_identity, device_name  # re-export until the merge
from kd.report.results import drop_phase, read_results  # re-export until the merge
from kd.report.results import write_results, write_results_files  # re-export until the merge
from kd.report.tables import describe_gains, print_table  # re-export until the merge
from kd.report.tables import ranked_students, warmup_notes  # re-export until the merge

__all__ = ['cpu_identity', 'device_name', 'drop_phase', 'read_results', 'write_results',
           'write_results_files', 'describe_gains', 'print_table', 'ranked_students',
           'warmup_notes']  # re-export until the merge
