"""``python -m markov_rsa``: the ``markov-rsa`` command."""

from markov_rsa.cli.main import main

if __name__ == "__main__":
    main(prog_name="python -m markov_rsa")
