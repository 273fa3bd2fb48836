from batchproxy.cli import main

main()
