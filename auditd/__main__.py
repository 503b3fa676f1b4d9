import sys

from auditd.cli import main

sys.exit(main())
