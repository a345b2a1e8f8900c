"""medgain: guided-attention (GAIN) training for medical image classifiers, built on MONAI.

Importing medgain installs :func:`medgain.errors.excepthook`: medgain's own input errors end the program with a
short report whose last line names the file or value and what is wrong (``MEDGAIN_TRACEBACK=1`` shows the full
traceback).
"""

from medgain.errors import install_excepthook

__version__ = "0.1.0"

install_excepthook()
