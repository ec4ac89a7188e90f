"""io/authors"""
