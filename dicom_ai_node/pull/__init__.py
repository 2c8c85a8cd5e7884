"""Pull from a PACS: query (C-FIND / QIDO-RS) and retrieve (C-MOVE / C-GET / WADO-RS) into the spool.

Retrieved instances take the same persist path as received ones (receive.ingest), so the completion
sweep routes them exactly as if the PACS had sent them.
"""
