"""Why a file could not be loaded as a checkpoint: one sentence for a person, read from the
file's first bytes and the unpickler's message (never PyTorch's weights_only advice)."""
import os
import pickletools
import re
import zipfile

_PICKLE_OPCODES = {op.code: op.name for op in pickletools.opcodes}


def _pickle_globals(path):
    """The module.name of every global the first pickle in path would import, read with
    pickletools (which decodes opcodes and never imports or calls anything)."""
    names, strings = [], []
    try:
        with open(path, 'rb') as f:
            for op, arg, _ in pickletools.genops(f):
                if op.name in ('GLOBAL', 'INST'):
                    names.append(arg.replace(' ', '.'))
                elif op.name == 'STACK_GLOBAL' and len(strings) >= 2:
                    names.append(f'{strings[-2]}.{strings[-1]}')
                elif isinstance(arg, str):
                    strings.append(arg)
                if op.name == 'STOP':
                    break
    except Exception:  # damaged or not a pickle: what was read so far
        pass
    return names


def load_failure_reason(path, error):
    """Why torch.load(weights_only=True) could not read path: one full sentence for a person,
    from the file's first bytes and the unpickler's message (never its weights_only advice)."""
    try:
        size = os.path.getsize(path)
        with open(path, 'rb') as f:
            head = f.read(512)
    except OSError as e:
        return f'it cannot be read ({e.strerror or e})'
    if size == 0:
        return 'it is empty (0 bytes)'
    message = str(error)
    if head.startswith(b'PK\x03\x04'):  # torch.save's zip format, or another zip archive
        reason = _zip_reason(path, message)
        if reason:
            return reason
    elif head[:1] != b'\x80':  # neither zip nor pickle (whose first opcode is PROTO)
        return _not_pickle_reason(head)
    return _refusal_reason(path, message) or _unpickler_reason(error, message)


def _zip_reason(path, message):
    """What is wrong with a zip archive that torch.load could not read, or None when it looks
    like a PyTorch file and the unpickler's message says more."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return ('it is a truncated or damaged zip archive (an interrupted write, copy or '
                'download?): PyTorch cannot find its table of contents')
    if not any(n.endswith('data.pkl') for n in names):
        shown = ', '.join(names[:3]) + (', ...' if len(names) > 3 else '')
        return f'it is a zip archive of something else, not a PyTorch file (it holds {shown})'
    if 'PytorchStreamReader' in message or 'CRC' in message or 'zip archive' in message:
        return 'it is a damaged PyTorch file: a part of its zip archive cannot be read'
    return None


def _not_pickle_reason(head):
    """What a file is that begins with neither a zip's nor a pickle's bytes: text, or other."""
    try:
        text = head.decode('utf-8')
    except UnicodeDecodeError:
        text = None
    if text is not None and '\x00' not in text:
        first = text.strip().splitlines()[0][:40] if text.strip() else ''
        return f'it is a text file, not a PyTorch file (it begins {first!r})'
    return 'it is not a PyTorch file (its first bytes are not those of torch.save\'s format)'


def _refusal_reason(path, message):
    """What a weights-only load refused to do (import, call or build something, or read a
    plain pickle's opcode), from the unpickler's message; None when it names none of these."""
    found = re.search(r'GLOBAL (\S+) (?:was not an allowed global|whose module)', message)
    if found:
        name = re.sub(r'^(posix|nt)\.', 'os.', found.group(1))
        return f'it would need to import {name}, which a weights-only load refuses'
    found = re.search(r'call reduce for unrecognized function (.+?)(?: which belongs|\n|$)',
                      message)
    if found:
        return f'it would call {found.group(1).strip()}, which a weights-only load refuses'
    found = re.search(r"(?:create new object|build) .*but got (?:<class )?'?([\w.]+)", message)
    if found:
        return f'it would build a {found.group(1)} object, which a weights-only load refuses'
    found = re.search(r'Unsupported operand (\d+)', message)
    if found:  # a plain pickle of protocol 4 or later: name what it would import, if anything
        imported = [g for g in _pickle_globals(path)
                    if g.split('.')[0] not in ('torch', 'collections')]
        if imported:
            name = re.sub(r'^(posix|nt)\.', 'os.', imported[0])
            return f'it would need to import {name}, which a weights-only load refuses'
        code = int(found.group(1))
        opcode = _PICKLE_OPCODES.get(chr(code), f'byte {code}')
        return (f'it is not a file written by torch.save: its pickle stream uses the opcode '
                f'{opcode}, which a weights-only load does not read')
    return None


def _unpickler_reason(error, message):
    """A truncated file, a plain pickle, a damaged archive, or else the unpickler's own reason
    without PyTorch's advice around it."""
    if 'Invalid magic number' in message:
        return 'it is a plain pickle, not a file written by torch.save'
    if isinstance(error, EOFError) or 'Ran out of input' in message:
        return 'it ends early: the file is truncated'
    if 'PytorchStreamReader' in message or 'zip archive' in message:
        return 'it is a damaged PyTorch file: its zip archive cannot be read'
    # anything else: the unpickler's own reason, without PyTorch's advice around it
    detail = message.split('WeightsUnpickler error:')[-1]
    sentences = [s.strip() for s in re.split(r'(?<=\.)\s+', ' '.join(detail.split()))
                 if s.strip() and 'weights_only' not in s and 'pytorch.org' not in s
                 and 'Weights only load failed' not in s]
    return (f'PyTorch cannot read it ({type(error).__name__}'
            + (f': {" ".join(sentences).rstrip(".")}' if sentences else '') + ')')
