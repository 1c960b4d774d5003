"""What a run suggests once it knows how long it will take: past an hour on a CPU, the commands
of a quick run and of the fast recipe (built by runner.quick_run_commands and
runner.fast_run_commands), each on its own line, ready to paste."""


def cpu_run_advice(device, quick_run, fast_run=()):
    """The loop's on_estimate callback: advise(seconds, log) writes the suggested commands with
    `log` when the phase should take more than an hour on a CPU. quick_run, fast_run: command
    lines (str); no advice without a quick run."""
    def advise(seconds, log):
        if device.type == 'cpu' and seconds > 3600 and quick_run:
            log('On a CPU, try the pipeline on part of the data first, in its own folder:')
            for command in quick_run:
                log(f'  {command}')
            if fast_run:
                log('Or the fast recipe (airbench94\'s techniques, 10 '
                    'epochs), in its own folder:')
                for command in fast_run:
                    log(f'  {command}')
    return advise
