import sys

from tasks.evaluation.runner import main

sys.exit(main())
