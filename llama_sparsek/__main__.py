from llama_sparsek.cli import main

main()
